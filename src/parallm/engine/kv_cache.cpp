#include "parallm/engine/kv_cache.h"

#include "parallm/core/error.h"

namespace parallm {

KvCache::KvCache(int64_t layers, int slots, int64_t capacity, int64_t kv_dim_local)
    : layers_(layers), slots_(slots), capacity_(capacity), kv_dim_(kv_dim_local) {
  if (layers < 1 || slots < 1 || capacity < 1 || kv_dim_local < 1)
    fail("kv-cache", "bad shape: layers ", layers, ", slots ", slots, ", capacity ", capacity,
         ", kv dim ", kv_dim_local);
  data_.resize(static_cast<size_t>(2 * layers * slots * capacity * kv_dim_local));
}

float* KvCache::base(int which, int64_t layer, int slot) {
  if (layer < 0 || layer >= layers_ || slot < 0 || slot >= slots_)
    fail("kv-cache", "layer ", layer, " slot ", slot, " out of range (", layers_, " layers, ",
         slots_, " slots)");
  const int64_t per = capacity_ * kv_dim_;
  return data_.data() + ((which * layers_ + layer) * slots_ + slot) * per;
}

}  // namespace parallm
