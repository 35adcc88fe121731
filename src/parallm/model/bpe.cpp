#include "parallm/model/bpe.h"

#include <cstdio>
#include <queue>

#include "parallm/core/error.h"
#include "parallm/model/tokenizer_unicode.h"

namespace parallm {

BpeModel::BpeModel(TokenMap vocab, const std::vector<std::pair<std::string, std::string>>& merges,
                   const BpeOptions& options, const std::string& source)
    : vocab_(std::move(vocab)), options_(options), byte_ids_(256, -1) {
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const int32_t a_id = find(a), b_id = find(b);
    if (a_id < 0 || b_id < 0) {
      fail(source, ": model.merges[", rank, "] \"", a, " ", b, "\" names token \"",
           a_id < 0 ? a : b, "\" which is not in model.vocab");
    }
    const int32_t new_id = find(a + b);
    if (new_id < 0) {
      fail(source, ": model.merges[", rank, "] \"", a, " ", b, "\" makes \"", a + b,
           "\" which is not in model.vocab");
    }
    // A repeated pair keeps its last rank, as Hugging Face's map insertion does.
    merges_[pair_key(a_id, b_id)] = Merge{static_cast<int32_t>(rank), new_id};
  }
  if (options_.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      const int32_t id = find(name);
      byte_ids_[b] = id;
      if (id >= 0) byte_of_id_[id] = b;
    }
  }
}

int BpeModel::byte_of(int32_t id) const {
  auto it = byte_of_id_.find(id);
  return it == byte_of_id_.end() ? -1 : it->second;
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    if (int32_t id = find(word); id >= 0) {
      out.push_back(id);
      return;
    }
  }

  // Symbols of the word as a doubly linked list over a vector; a merged-away symbol is dead.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&symbols](int32_t id) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back(Symbol{id, n - 1, -1, true});
  };

  int32_t pending_unk = -1;  // an unknown run waiting to be added (fuse_unk)
  for (size_t pos = 0; pos < word.size();) {
    char32_t cp;
    const size_t len = unicode::decode_utf8(word, pos, &cp);
    const std::string_view ch = word.substr(pos, len);
    pos += len;
    if (int32_t id = find(ch); id >= 0) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(id);
      continue;
    }
    if (options_.byte_fallback) {
      bool all = true;
      for (char c : ch) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
        for (char c : ch) add(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (options_.unk_id < 0) {
      fail("tokenizer", "character \"", unicode::sanitize_utf8(ch),
           "\" is not in the vocabulary and the tokenizer has no unknown token or byte fallback");
    }
    if (pending_unk >= 0 && !options_.fuse_unk) add(pending_unk);
    pending_unk = options_.unk_id;
  }
  if (pending_unk >= 0) add(pending_unk);

  // Candidate merges, lowest rank first, then leftmost. Entries go stale when a neighbour merges;
  // a stale entry is recognised because its pair no longer makes the same token.
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  auto consider = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    auto it = merges_.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) queue.push(Candidate{it->second.rank, left, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(pair_key(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;  // stale
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (const Symbol& s : symbols) {
    if (s.alive) out.push_back(s.id);
  }
}

ByteLevelMap::ByteLevelMap() {
  // Bytes that are printable Latin-1 keep their code point; the rest take 256, 257, ... in order.
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
    unicode::append_utf8(byte_to_utf8_[b], cp);
    char_to_byte_[cp] = static_cast<unsigned char>(b);
  }
}

std::string ByteLevelMap::encode(std::string_view text) const {
  std::string out;
  out.reserve(text.size() * 2);
  for (char c : text) out += byte_to_utf8_[static_cast<unsigned char>(c)];
  return out;
}

std::string ByteLevelMap::decode(std::string_view token) const {
  std::string out;
  out.reserve(token.size());
  for (size_t pos = 0; pos < token.size();) {
    char32_t cp;
    const size_t len = unicode::decode_utf8(token, pos, &cp);
    auto it = cp == unicode::kInvalid ? char_to_byte_.end() : char_to_byte_.find(cp);
    if (it != char_to_byte_.end()) {
      out += static_cast<char>(it->second);
    } else {
      out.append(token.substr(pos, len));
    }
    pos += len;
  }
  return out;
}

}  // namespace parallm
