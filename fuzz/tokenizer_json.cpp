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
    static const char* const kTexts[] = {"Hello world", " a  b\tc\n", "<s>x</s><unk>",
                                         "\xC3\xA9t\xC3\xA9 \xE2\x96\x81 \xF0\x9F\x98\x80",
                                         "\xFF\xFE bad utf8 \xC3", "123 456, it's"};
    for (const char* text : kTexts) {
      parallm::fuzz::expect_clean([&] {
        const std::vector<int32_t> ids = tok->encode(text, true);
        (void)tok->decode(ids);
        int32_t prev = -1;
        for (int32_t id : ids) (void)tok->decode_token(prev, id), prev = id;
      });
    }
    const int32_t n = tok->vocab_size();
    for (int32_t id = 0; id < n && id < 256; ++id) {
      parallm::fuzz::expect_clean([&] {
        (void)tok->decode_token(-1, id);
        (void)tok->piece_to_id(tok->id_to_piece(id));
      });
    }
  });
  return 0;
}
