#include "parallm/model/bpe_split.h"

#include "parallm/model/tokenizer_unicode.h"

namespace parallm {
namespace {

constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The same with the contractions' case spelled out, as converters that avoid (?i) write it.
constexpr std::string_view kLlama3RegexNoFlag =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The text as code points with their byte offsets; offset[n] == text.size().
struct Chars {
  std::vector<char32_t> cp;
  std::vector<size_t> offset;

  explicit Chars(std::string_view text) {
    cp.reserve(text.size());
    offset.reserve(text.size() + 1);
    for (size_t pos = 0; pos < text.size();) {
      char32_t c;
      const size_t len = unicode::decode_utf8(text, pos, &c);
      cp.push_back(c);
      offset.push_back(pos);
      pos += len;
    }
    offset.push_back(text.size());
  }
  size_t size() const { return cp.size(); }
  bool letter(size_t i) const { return i < size() && unicode::is_letter(cp[i]); }
  bool number(size_t i) const { return i < size() && unicode::is_number(cp[i]); }
  bool space(size_t i) const { return i < size() && unicode::is_whitespace(cp[i]); }
  bool newline(size_t i) const { return i < size() && (cp[i] == '\r' || cp[i] == '\n'); }
  // [^\s\p{L}\p{N}]
  bool other(size_t i) const { return i < size() && !space(i) && !letter(i) && !number(i); }
  bool is(size_t i, char32_t c) const { return i < size() && cp[i] == c; }
};

char32_t fold_ascii(char32_t c) {
  return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
}

// 's 't 're 've 'm 'll 'd at i: returns the end, or i when there is none.
size_t match_contraction(const Chars& t, size_t i, bool fold) {
  if (!t.is(i, '\'')) return i;
  auto at = [&](size_t k) -> char32_t {
    if (k >= t.size()) return 0;
    return fold ? fold_ascii(t.cp[k]) : t.cp[k];
  };
  const char32_t a = at(i + 1), b = at(i + 2);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
  return i;
}

// \s+(?!\S) then \s+ at i (t.space(i) holds): the whitespace run, leaving its last character to
// the next word when a non-space follows and the run is longer than one.
size_t match_spaces(const Chars& t, size_t i) {
  size_t k = i;
  while (t.space(k)) ++k;
  if (k < t.size() && k - i >= 2) return k - 1;
  return k;
}

size_t match_gpt2(const Chars& t, size_t i) {
  if (size_t e = match_contraction(t, i, false); e != i) return e;
  const size_t s = t.is(i, ' ') ? i + 1 : i;  // the optional leading space
  // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': the space only counts when the class follows.
  if (t.letter(s)) {
    size_t e = s;
    while (t.letter(e)) ++e;
    return e;
  }
  if (t.letter(i)) {
    size_t e = i;
    while (t.letter(e)) ++e;
    return e;
  }
  if (t.number(s)) {
    size_t e = s;
    while (t.number(e)) ++e;
    return e;
  }
  if (t.other(s)) {
    size_t e = s;
    while (t.other(e)) ++e;
    return e;
  }
  if (t.space(i)) return match_spaces(t, i);
  return i + 1;  // unreachable: every character is a letter, number, space or other
}

size_t match_llama3(const Chars& t, size_t i) {
  if (size_t e = match_contraction(t, i, true); e != i) return e;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  {
    size_t s = i;
    if (!t.newline(i) && !t.letter(i) && !t.number(i) && i < t.size() && t.letter(i + 1)) s = i + 1;
    if (t.letter(s)) {
      size_t e = s;
      while (t.letter(e)) ++e;
      return e;
    }
  }
  // \p{N}{1,3}
  if (t.number(i)) {
    size_t e = i;
    while (e < i + 3 && t.number(e)) ++e;
    return e;
  }
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  {
    const size_t s = (t.is(i, ' ') && t.other(i + 1)) ? i + 1 : i;
    if (t.other(s)) {
      size_t e = s;
      while (t.other(e)) ++e;
      while (t.newline(e)) ++e;
      return e;
    }
  }
  if (t.space(i)) {
    // \s*[\r\n]+: up to and including the last newline of the whitespace run.
    size_t k = i, last_newline = t.size();
    for (; t.space(k); ++k) {
      if (t.newline(k)) last_newline = k;
    }
    if (last_newline != t.size()) return last_newline + 1;
    return match_spaces(t, i);
  }
  return i + 1;  // unreachable
}

}  // namespace

std::optional<SplitPattern> split_pattern_from_regex(std::string_view regex) {
  if (regex == kGpt2Regex) return SplitPattern::kGpt2;
  if (regex == kLlama3Regex || regex == kLlama3RegexNoFlag) return SplitPattern::kLlama3;
  return std::nullopt;
}

std::vector<std::string_view> split_words(std::string_view text, SplitPattern pattern) {
  const Chars t(text);
  std::vector<std::string_view> words;
  for (size_t i = 0; i < t.size();) {
    const size_t e = pattern == SplitPattern::kGpt2 ? match_gpt2(t, i) : match_llama3(t, i);
    words.push_back(text.substr(t.offset[i], t.offset[e] - t.offset[i]));
    i = e;
  }
  return words;
}

}  // namespace parallm
