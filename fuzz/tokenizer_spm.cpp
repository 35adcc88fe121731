// Fuzzes the sentencepiece tokenizer.model loader (model/tokenizer_spm.h, parse_sentencepiece_tokenizer; the protobuf itself is parsed by libsentencepiece) and,
// when a tokenizer loads, encodes and decodes a few fixed texts with it (the merges, added tokens
// and pre-tokenizer regexes the input brought are then run, not only parsed).
#include <string>
#include <vector>

#include "fuzz_main.h"
#include "parallm/model/tokenizer_spm.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean([&] {
    auto tok = parallm::parse_sentencepiece_tokenizer(parallm::fuzz::as_text(data, size),
                                           "fuzz/tokenizer.model");
    parallm::fuzz::exercise_tokenizer(*tok);
  });
  return 0;
}
