// The regex pre-split of byte-level BPE tokenizers, written out by hand (std::regex has no
// \p{L}). Two patterns are supported, recognised by their exact text in tokenizer.json:
//
// kGpt2 (GPT-2, and the ByteLevel pre-tokenizer's built-in regex):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// kLlama3 (LLaMA-3):
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
//   (also with the contractions spelled (?:'[sS]|'[tT]|'[rR][eE]|...) instead of (?i:...)).
//
// Semantics are those of a backtracking regex engine (first alternative that matches wins, each
// greedy): e.g. "a   b" -> "a", "  ", " b". Letters/numbers/whitespace are classified with the
// Unicode tables in tokenizer_unicode.h; the case-insensitive contractions of kLlama3 fold ASCII
// letters only; bytes that are not valid UTF-8 count as punctuation, one byte each.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace parallm {

enum class SplitPattern { kGpt2, kLlama3 };

// The pattern whose regex text is `regex`, or nullopt when it is not one we implement.
std::optional<SplitPattern> split_pattern_from_regex(std::string_view regex);

// The matches of `pattern` over `text`, in order; together they cover the whole text.
std::vector<std::string_view> split_words(std::string_view text, SplitPattern pattern);

}  // namespace parallm
