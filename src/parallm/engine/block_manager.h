// BlockManager: world rank 0's bookkeeping of the paged KV cache's blocks (vLLM's block pool):
// which blocks are free, how many sequences use each (reference counts: prefix-cached blocks are
// shared), and the prefix cache.
//
// Prefix caching (enable_prefix_caching): a block that a sequence has filled (block_size computed
// positions) is registered under the hash chain of its tokens: hash(parent block's hash, its
// block_size token ids), so a block's key names every token before it too. A new sequence whose
// leading full blocks have the same chain reuses those blocks instead of computing them. The
// tokens are stored with the key and compared on a hit, so a hash collision is never a wrong hit.
// A cached block whose last user finished stays cached but evictable: allocation takes truly free
// blocks first, then evicts the least recently released cached block (LRU).
//
// Single-threaded: only the scheduler's thread calls it.
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace parallm {

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size, bool prefix_caching);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks an allocation may take now: free ones and evictable cached ones.
  int64_t available() const {
    return static_cast<int64_t>(free_.size()) + static_cast<int64_t>(lru_.size());
  }
  // Blocks some sequence holds (reference count > 0).
  int64_t used() const { return num_blocks_ - available(); }

  // n blocks with reference count 1, appended to `out`; false (nothing taken) when fewer than n
  // are available.
  bool allocate(int64_t n, std::vector<int32_t>& out);
  // Drops one reference of each block, last block first (so that a sequence's tail is evicted
  // before its head: the head is the likelier shared prefix).
  void release(const std::vector<int32_t>& blocks);

  // The hash of a full block after `parent` (0 for the first block).
  static uint64_t chain_hash(uint64_t parent, const int32_t* tokens, int64_t block_size);
  // Registers `block` (full, computed) under `hash` = chain_hash(parent, tokens); a block already
  // registered, or a hash already taken by another block, is left as it is.
  void register_full(int32_t block, uint64_t hash, uint64_t parent, const int32_t* tokens);
  // The cached block for (hash, parent, tokens), with one more reference (taken out of the LRU
  // when it had none); -1 when not cached. Parent and tokens are compared, not only the hash.
  int32_t lookup(uint64_t hash, uint64_t parent, const int32_t* tokens);

 private:
  struct Cached {
    uint64_t hash = 0, parent = 0;
    std::vector<int32_t> tokens;
  };

  int64_t num_blocks_, block_size_;
  bool prefix_caching_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // reference 0 and not cached; taken from the back
  std::list<int32_t> lru_;     // reference 0 and cached: front = least recently released
  std::vector<std::list<int32_t>::iterator> lru_pos_;  // valid where in_lru_
  std::vector<char> in_lru_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::vector<Cached> cached_;  // per block; tokens empty = not cached
};

}  // namespace parallm
