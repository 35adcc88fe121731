// Sentencepiece tokenizer.model (LLaMA-1/2, TinyLlama, Mistral) through libsentencepiece.
#pragma once

#include <memory>
#include <string>

#include "parallm/model/tokenizer.h"

namespace parallm {

// Throws std::runtime_error naming `file` when it is missing or libsentencepiece rejects it.
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& file);

}  // namespace parallm
