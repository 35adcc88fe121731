#include "parallm/engine/block_manager.h"

#include <algorithm>

#include "parallm/core/error.h"

namespace parallm {

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), prefix_caching_(prefix_caching) {
  if (num_blocks < 1 || block_size < 1)
    fail("serve", "a KV cache of ", num_blocks, " blocks of ", block_size, " positions");
  refs_.assign(num_blocks, 0);
  lru_pos_.resize(num_blocks);
  in_lru_.assign(num_blocks, 0);
  cached_.resize(num_blocks);
  // Taken from the back: block 0 first.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

bool BlockManager::allocate(int64_t n, std::vector<int32_t>& out) {
  if (n <= 0) return true;
  if (n > available()) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else {
      // Evict the least recently released cached block.
      b = lru_.front();
      lru_.pop_front();
      in_lru_[b] = 0;
      by_hash_.erase(cached_[b].hash);
      cached_[b] = {};
    }
    refs_[b] = 1;
    out.push_back(b);
  }
  return true;
}

void BlockManager::release(const std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    const int32_t b = *it;
    if (b < 0 || b >= num_blocks_ || refs_[b] <= 0)
      fail<std::logic_error>("serve", "release of block ", b, " with ",
                             b >= 0 && b < num_blocks_ ? refs_[b] : -1, " references");
    if (--refs_[b] > 0) continue;
    if (!cached_[b].tokens.empty()) {
      lru_pos_[b] = lru_.insert(lru_.end(), b);
      in_lru_[b] = 1;
    } else {
      free_.push_back(b);
    }
  }
}

uint64_t BlockManager::chain_hash(uint64_t parent, const int32_t* tokens, int64_t block_size) {
  // FNV-1a over the parent hash and the token ids, then a final mix (splitmix64's).
  uint64_t h = 1469598103934665603ull ^ parent;
  auto mix = [&](uint64_t v) {
    for (int k = 0; k < 8; ++k) {
      h ^= (v >> (8 * k)) & 0xff;
      h *= 1099511628211ull;
    }
  };
  mix(parent);
  for (int64_t i = 0; i < block_size; ++i) mix(static_cast<uint32_t>(tokens[i]));
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

void BlockManager::register_full(int32_t block, uint64_t hash, uint64_t parent,
                                 const int32_t* tokens) {
  if (!prefix_caching_ || !cached_[block].tokens.empty() || by_hash_.count(hash)) return;
  cached_[block].hash = hash;
  cached_[block].parent = parent;
  cached_[block].tokens.assign(tokens, tokens + block_size_);
  by_hash_[hash] = block;
}

int32_t BlockManager::lookup(uint64_t hash, uint64_t parent, const int32_t* tokens) {
  if (!prefix_caching_) return -1;
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return -1;
  const int32_t b = it->second;
  if (cached_[b].parent != parent ||
      !std::equal(tokens, tokens + block_size_, cached_[b].tokens.begin()))
    return -1;
  if (refs_[b] == 0 && in_lru_[b]) {
    lru_.erase(lru_pos_[b]);
    in_lru_[b] = 0;
  }
  ++refs_[b];
  return b;
}

}  // namespace parallm
