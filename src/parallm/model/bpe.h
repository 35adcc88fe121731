// BpeModel: byte-pair encoding by merge rank, as Hugging Face tokenizers' BPE model does it.
// A word (one pre-tokenized piece, already in the vocabulary's alphabet) starts as one symbol per
// character; the adjacent pair with the lowest merge rank (leftmost on ties) is merged until no
// pair has a merge. Characters missing from the vocabulary become <0xNN> byte tokens
// (byte_fallback) or the unknown token.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace parallm {

// Hash for heterogeneous lookup: find(std::string_view) without building a std::string.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

struct BpeOptions {
  bool byte_fallback = false;  // unknown character -> its UTF-8 bytes as <0xNN> tokens
  bool fuse_unk = false;       // consecutive unknown characters -> one unknown token
  bool ignore_merges = false;  // a word that is itself in the vocabulary is one token (LLaMA-3)
  int32_t unk_id = -1;         // -1: no unknown token (an unknown character is an error)
};

class BpeModel {
 public:
  BpeModel() = default;
  // `merges` in rank order. Throws std::invalid_argument naming `source` when a merge names a
  // token (or makes one) that is not in `vocab`.
  BpeModel(TokenMap vocab, const std::vector<std::pair<std::string, std::string>>& merges,
           const BpeOptions& options, const std::string& source);

  // Appends the ids of `word` to `out`.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  const TokenMap& vocab() const { return vocab_; }
  // The id of `token`, -1 if it is not in the vocabulary.
  int32_t find(std::string_view token) const {
    auto it = vocab_.find(token);
    return it == vocab_.end() ? -1 : it->second;
  }
  // The byte a <0xNN> token stands for, or -1 (also when byte_fallback is off).
  int byte_of(int32_t id) const;
  const BpeOptions& options() const { return options_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  TokenMap vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  BpeOptions options_;
  std::vector<int32_t> byte_ids_;                // byte -> id of <0xNN>, -1 when absent
  std::unordered_map<int32_t, int> byte_of_id_;  // id of <0xNN> -> byte
};

// The GPT-2 byte-to-unicode map that byte-level BPE spells its tokens with: printable Latin-1
// bytes stand for themselves, the other 68 map to U+0100 onwards (space -> "Ġ", '\n' -> "Ċ").
class ByteLevelMap {
 public:
  ByteLevelMap();
  // UTF-8 of the character that stands for byte `b`.
  const std::string& encode_byte(unsigned char b) const { return byte_to_utf8_[b]; }
  // The bytes of `text`, each mapped to its character.
  std::string encode(std::string_view text) const;
  // Inverse of encode(); characters outside the map are copied as UTF-8 (never thrown on,
  // so decoding a hand-edited vocabulary cannot fail).
  std::string decode(std::string_view token) const;

 private:
  std::string byte_to_utf8_[256];
  std::unordered_map<char32_t, unsigned char> char_to_byte_;
};

}  // namespace parallm
