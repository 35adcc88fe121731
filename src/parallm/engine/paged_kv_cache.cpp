#include "parallm/engine/paged_kv_cache.h"

#include "parallm/core/error.h"

namespace parallm {

uint64_t kv_block_bytes(int64_t layers, int64_t kv_dim_local, int64_t block_size) {
  // keys and values, f32
  return static_cast<uint64_t>(layers) * static_cast<uint64_t>(kv_dim_local) * 2u * 4u *
         static_cast<uint64_t>(block_size);
}

PagedKvCache::PagedKvCache(int64_t layers, int64_t kv_dim_local, int64_t num_blocks,
                           int64_t block_size, int slots, int64_t max_blocks_per_slot)
    : layers_(layers),
      kv_dim_(kv_dim_local),
      num_blocks_(num_blocks),
      block_size_(block_size),
      max_blocks_(max_blocks_per_slot) {
  if (layers < 1 || kv_dim_local < 1 || num_blocks < 1 || block_size < 1 || slots < 1 ||
      max_blocks_per_slot < 1)
    fail("kv-cache", "bad paged shape: layers ", layers, ", kv dim ", kv_dim_local, ", blocks ",
         num_blocks, " of ", block_size, " positions, slots ", slots, ", table length ",
         max_blocks_per_slot);
  tables_.resize(slots);
  for (auto& t : tables_) t.reserve(max_blocks_per_slot);
  data_.resize(static_cast<size_t>(2 * layers * num_blocks * block_size * kv_dim_local));
}

float* PagedKvCache::pool(int which, int64_t layer) {
  if (layer < 0 || layer >= layers_)
    fail("kv-cache", "layer ", layer, " out of range (", layers_, " layers)");
  return data_.data() + (which * layers_ + layer) * num_blocks_ * block_size_ * kv_dim_;
}

void PagedKvCache::reset(int slot) {
  if (slot < 0 || slot >= static_cast<int>(tables_.size()))
    fail<std::runtime_error>("kv-cache", "slot ", slot, " out of range (", tables_.size(),
                             " slots)");
  tables_[slot].clear();
}

void PagedKvCache::append(int slot, const int32_t* blocks, int64_t n) {
  if (slot < 0 || slot >= static_cast<int>(tables_.size()))
    fail<std::runtime_error>("kv-cache", "slot ", slot, " out of range (", tables_.size(),
                             " slots)");
  std::vector<int32_t>& t = tables_[slot];
  if (static_cast<int64_t>(t.size()) + n > max_blocks_)
    fail<std::runtime_error>("kv-cache", "slot ", slot, ": a block table of ",
                             static_cast<int64_t>(t.size()) + n, " blocks exceeds ", max_blocks_);
  for (int64_t i = 0; i < n; ++i) {
    if (blocks[i] < 0 || blocks[i] >= num_blocks_)
      fail<std::runtime_error>("kv-cache", "slot ", slot, ": block ", blocks[i],
                               " outside the pool of ", num_blocks_);
    t.push_back(blocks[i]);
  }
}

}  // namespace parallm
