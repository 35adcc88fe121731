// Fuzzes the Hugging Face tokenizer.json loader (model/tokenizer_hf.h, parse_hf_tokenizer) and,
// when a tokenizer loads, encodes and decodes a few fixed texts with it (the merges, added tokens
// and pre-tokenizer regexes the input brought are then run, not only parsed).
#include <string>
#include <vector>

#include "fuzz_main.h"
#include "parallm/model/tokenizer_hf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean([&] {
    // No file sits beside this path: config.json and friends are not read.
    auto tok = parallm::parse_hf_tokenizer(parallm::fuzz::as_text(data, size),
                                           "/nonexistent-fuzz-dir/tokenizer.json");
    parallm::fuzz::exercise_tokenizer(*tok);
  });
  return 0;
}
