// The regex pre-split of byte-level BPE tokenizers: tokenizer.json's `Split` pre-tokenizer (any
// regex, or a plain string), and the GPT-2 regex that `ByteLevel` runs when use_regex is true.
// The regex runs on PCRE2 in UTF mode with Unicode properties (PCRE2_UTF | PCRE2_UCP), so the
// Hugging Face patterns work as written: \p{L}, \p{N}, \s (Unicode white space), (?i:...) with
// Unicode case folding, lookaheads such as \s+(?!\S), possessive and atomic groups. A pattern is
// compiled once, when the tokenizer is loaded.
//
// The split is Hugging Face's "Isolated" behaviour: every match is a piece, and so is every run
// of text between two matches (a pattern that matches everywhere, like the GPT-2 and LLaMA-3
// ones, leaves no such run). Empty matches cut the text without making a piece. Bytes that are
// not valid UTF-8 match nothing (PCRE2_MATCH_INVALID_UTF): they fall in the runs between matches.
// Hugging Face never sees such bytes (its text is a Rust &str); here they stay bytes, each of
// which the byte-level BPE alphabet can encode.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace parallm {

// GPT-2's pattern, also the one ByteLevel(use_regex = true) runs.
inline constexpr std::string_view kGpt2SplitRegex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// LLaMA-3's pattern.
inline constexpr std::string_view kLlama3SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

class SplitRegex {
 public:
  // Compiles `pattern`: a regex, or with `literal` a plain string to cut at (tokenizer.json's
  // {"String": ...} pattern). Throws std::invalid_argument naming `where` (e.g. the file and the
  // field), the pattern, PCRE2's message and the offset when it does not compile.
  SplitRegex(std::string_view pattern, bool literal, std::string_view where);
  explicit SplitRegex(std::string_view regex) : SplitRegex(regex, false, "split regex") {}
  ~SplitRegex();
  SplitRegex(SplitRegex&&) noexcept;
  SplitRegex& operator=(SplitRegex&&) noexcept;

  // The pieces of `text` in order (views into it); together they are the whole text. Safe to
  // call from several threads at once (each call has its own match data).
  std::vector<std::string_view> split(std::string_view text) const;

  const std::string& pattern() const;

 private:
  struct Compiled;  // owns the pcre2_code
  std::unique_ptr<Compiled> compiled_;
};

}  // namespace parallm
