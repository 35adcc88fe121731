// Sentencepiece tokenizer.model (LLaMA-1/2, TinyLlama, Mistral) through libsentencepiece.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "parallm/model/tokenizer.h"

namespace parallm {

// Throws std::runtime_error naming `file` when it is missing or libsentencepiece rejects it.
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& file);

// The same from the file's contents in `bytes` (`file` names it in errors); the fuzzer
// (fuzz/tokenizer_spm.cpp) calls it on bytes in memory.
std::unique_ptr<Tokenizer> parse_sentencepiece_tokenizer(std::string_view bytes,
                                                         const std::string& file);

}  // namespace parallm
