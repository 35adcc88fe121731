// Shared by the libFuzzer targets: the contract every parser is fuzzed against. Any input either
// parses or throws a std::exception (a clean, one-line error); anything else -- a crash, a
// sanitizer report, an exception of another type, a hang, a huge allocation -- is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string_view>
#include <vector>

#include "parallm/model/tokenizer.h"

namespace parallm::fuzz {

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs `body`, swallowing the clean errors; anything else escapes to libFuzzer (an uncaught
// exception of another type terminates, which libFuzzer reports as a crash).
template <class F>
void expect_clean(F&& body) {
  try {
    body();
  } catch (const std::exception&) {
  }
}

// Once a fuzzed tokenizer loads: encodes and decodes a few fixed texts with it and turns its first
// ids into pieces and back, so the merges, added tokens and pre-tokenizer regexes the input brought
// are run, not only parsed.
inline void exercise_tokenizer(const Tokenizer& tok) {
  static const char* const kTexts[] = {"Hello world", " a  b\tc\n", "<s>x</s><unk>",
                                       "\xC3\xA9t\xC3\xA9 \xE2\x96\x81 \xF0\x9F\x98\x80",
                                       "\xFF\xFE bad utf8 \xC3", "123 456, it's"};
  for (const char* text : kTexts) {
    expect_clean([&] {
      const std::vector<int32_t> ids = tok.encode(text, true);
      (void)tok.decode(ids);
      int32_t prev = -1;
      for (int32_t id : ids) (void)tok.decode_token(prev, id), prev = id;
    });
  }
  const int32_t n = tok.vocab_size();
  for (int32_t id = 0; id < n && id < 256; ++id) {
    expect_clean([&] {
      (void)tok.decode_token(-1, id);
      (void)tok.piece_to_id(tok.id_to_piece(id));
    });
  }
}

}  // namespace parallm::fuzz
