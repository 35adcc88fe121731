// KvCache: keys and values of every sequence slot for this rank's layers and KV heads, f32.
// Layout per layer and slot: [capacity, kv_dim_local] (position-major), so a decode step appends
// one contiguous row and attention reads positions in order.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/model/llama.h"

namespace parallm {

class KvCache : public KvStore {
 public:
  KvCache(int64_t layers, int slots, int64_t capacity, int64_t kv_dim_local);

  float* keys(int64_t layer, int slot) override { return base(0, layer, slot); }
  float* values(int64_t layer, int slot) override { return base(1, layer, slot); }
  int64_t kv_stride() const override { return kv_dim_; }
  int64_t capacity() const override { return capacity_; }
  uint64_t bytes() const { return data_.size() * sizeof(float); }

 private:
  float* base(int which, int64_t layer, int slot);

  int64_t layers_;
  int slots_;
  int64_t capacity_, kv_dim_;
  std::vector<float> data_;
};

}  // namespace parallm
