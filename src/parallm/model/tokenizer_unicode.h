// UTF-8 and Unicode character classes for the tokenizers. The pre-split regex runs on PCRE2
// (bpe_split.h); these classes serve the rest: the word boundaries of added tokens (single_word,
// lstrip, rstrip) use \p{L} (general category L*), \p{N} (N*) and \s (the White_Space property),
// and a test checks that they agree with PCRE2's on every code point.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace parallm::unicode {

// Code point returned for a byte that does not start a valid UTF-8 sequence; classified as
// neither letter, number nor whitespace.
inline constexpr char32_t kInvalid = 0xFFFFFFFF;

// Decodes the character at s[pos] (pos < s.size()). Returns its length in bytes (1..4) and
// stores the code point in *cp; an invalid or truncated sequence gives length 1 and kInvalid.
size_t decode_utf8(std::string_view s, size_t pos, char32_t* cp);

// Appends the UTF-8 encoding of `cp` (must be a valid scalar value).
void append_utf8(std::string& out, char32_t cp);

bool is_letter(char32_t cp);      // \p{L}
bool is_number(char32_t cp);      // \p{N}
bool is_whitespace(char32_t cp);  // \s

// `s` with every ill-formed part replaced by U+FFFD, one per maximal ill-formed subpart (the
// Unicode "best practice" that Python's errors="replace" also follows).
std::string sanitize_utf8(std::string_view s);

// Length of the longest prefix of `s` that does not end inside an unfinished but so far valid
// UTF-8 sequence: s.substr(prefix) is 1..3 bytes that more bytes could still complete.
size_t complete_utf8_prefix(std::string_view s);

}  // namespace parallm::unicode
