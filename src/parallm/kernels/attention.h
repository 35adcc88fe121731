// Causal grouped-query attention over a KV cache.
#pragma once

#include <cstdint>

namespace parallm::kernels {

struct AttentionShape {
  int64_t q_heads = 0;   // query heads (of this rank)
  int64_t kv_heads = 0;  // KV heads (of this rank); q_heads % kv_heads == 0
  int64_t head_dim = 0;
  int64_t kv_stride = 0;  // floats between consecutive positions in k_cache / v_cache
};

// q: [T, q_heads, head_dim]; k_cache, v_cache: position p of KV head h at
// cache + p * kv_stride + h * head_dim. Query t sits at position start_pos + t and attends to
// positions 0 ..= start_pos + t (which must already be in the cache). Query head h reads KV head
// h / (q_heads / kv_heads). out: [T, q_heads, head_dim]. scale: usually 1/sqrt(head_dim).
void attention(const float* q, const float* k_cache, const float* v_cache, float* out, int64_t T,
               int64_t start_pos, const AttentionShape& shape, float scale);
void attention_ref(const float* q, const float* k_cache, const float* v_cache, float* out,
                   int64_t T, int64_t start_pos, const AttentionShape& shape, float scale);

// The same over a paged cache (vLLM's block tables): positions live in blocks of block_size
// positions, and position p of the sequence is row block_table[p / block_size] * block_size +
// p % block_size of the pools (a row is kv_stride floats, KV head h at + h * head_dim). The fast
// version does exactly the arithmetic of attention() in the same order, so its output is bit for
// bit attention()'s on the same keys and values laid out contiguously.
struct PagedCache {
  const float* k_pool = nullptr;
  const float* v_pool = nullptr;
  const int32_t* block_table = nullptr;  // [ceil((start_pos + T) / block_size)] at least
  int64_t block_size = 0;
};
void attention_paged(const float* q, const PagedCache& cache, float* out, int64_t T,
                     int64_t start_pos, const AttentionShape& shape, float scale);
void attention_paged_ref(const float* q, const PagedCache& cache, float* out, int64_t T,
                         int64_t start_pos, const AttentionShape& shape, float scale);

}  // namespace parallm::kernels
