// PagedKvCache: the serving KV cache (vLLM's paged design). Keys and values of this rank's layers
// and KV heads, f32, in fixed-size blocks of block_size positions: per layer one pool of
// [num_blocks * block_size, kv_dim_local] rows for keys and one for values. Each sequence slot has
// a block table (physical block per logical block); attention reads and writes through it
// (parallel::KvStore's paged layout).
//
// Which block belongs to whom is decided on world rank 0 (engine/block_manager.h) and reaches
// every rank in the step plans (engine/serve_plan.h): each plan entry names the blocks appended to
// its slot's table in that step, and `init` entries restart the table. Every rank follows the same
// plans in the same order, so every rank holds the same tables.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/model/llama.h"

namespace parallm {

// Bytes one block takes on a rank holding `layers` layers of kv_dim_local key (and value) floats.
uint64_t kv_block_bytes(int64_t layers, int64_t kv_dim_local, int64_t block_size);

class PagedKvCache : public KvStore {
 public:
  // slots: the most sequences at once; max_blocks_per_slot: a table's longest length.
  PagedKvCache(int64_t layers, int64_t kv_dim_local, int64_t num_blocks, int64_t block_size,
               int slots, int64_t max_blocks_per_slot);

  float* keys(int64_t layer, int /*slot*/) override { return pool(0, layer); }
  float* values(int64_t layer, int /*slot*/) override { return pool(1, layer); }
  int64_t kv_stride() const override { return kv_dim_; }
  int64_t capacity() const override { return max_blocks_ * block_size_; }
  int64_t block_size() const override { return block_size_; }
  const int32_t* block_table(int slot) const override { return tables_.at(slot).data(); }
  int64_t table_blocks(int slot) const override {
    return static_cast<int64_t>(tables_.at(slot).size());
  }

  // The slot's table: cleared (a new or restarted sequence), or extended by `blocks`. Throws
  // std::runtime_error for a block outside the pool or a table past max_blocks_per_slot.
  void reset(int slot);
  void append(int slot, const int32_t* blocks, int64_t n);

  int64_t num_blocks() const { return num_blocks_; }
  uint64_t bytes() const { return data_.size() * sizeof(float); }

 private:
  float* pool(int which, int64_t layer);

  int64_t layers_, kv_dim_, num_blocks_, block_size_, max_blocks_;
  std::vector<std::vector<int32_t>> tables_;
  std::vector<float> data_;
};

}  // namespace parallm
