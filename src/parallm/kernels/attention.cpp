// Causal grouped-query attention over a KV cache.
//
// The fast version hands (token, query head) pairs to the pool dynamically (later tokens of a
// prefill see more positions, so the work is uneven); each pair computes its scores with SIMD
// dot products, a numerically stable softmax (max subtracted) and the weighted sum of V rows.
#include "parallm/kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/simd.h"
#include "parallm/kernels/vec.h"

namespace parallm::kernels {
namespace {

void check_shape(const AttentionShape& s, int64_t T, int64_t start_pos, const char* fn) {
  if (s.q_heads <= 0 || s.kv_heads <= 0 || s.head_dim <= 0)
    fail("attention", fn, ": q_heads, kv_heads and head_dim must be > 0, got ", s.q_heads, ", ",
         s.kv_heads, ", ", s.head_dim);
  if (s.q_heads % s.kv_heads != 0)
    fail("attention", fn, ": q_heads (", s.q_heads, ") must be a multiple of kv_heads (",
         s.kv_heads, ")");
  if (s.kv_stride < s.kv_heads * s.head_dim)
    fail("attention", fn, ": kv_stride ", s.kv_stride,
         " is less than kv_heads * head_dim = ", s.kv_heads * s.head_dim);
  if (T < 0 || start_pos < 0)
    fail("attention", fn, ": T and start_pos must be >= 0, got ", T, " and ", start_pos);
}

#if PARALLM_X86
// One (token, head) pair with head_dim D = 16 * C (C <= 8), AVX2: the same operations in the same
// order as vec::dot_avx2 and vec::axpy_avx2 (so the same bits), with q and the output row held in
// registers across positions instead of a call, a reload and a store per position.
template <int C, class Row>
PARALLM_AVX2 void attend_avx2(const float* qv, const float* kb, const float* vb, int64_t stride,
                              int64_t len, float scale, const Row& row, float* scores, float* o,
                              SimdLevel level) {
  __m256 q[2 * C];
#pragma GCC unroll 16
  for (int j = 0; j < 2 * C; ++j) q[j] = _mm256_loadu_ps(qv + 8 * j);
  for (int64_t p = 0; p < len; ++p) {
    const float* k = kb + row(p) * stride;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      s0 = _mm256_fmadd_ps(q[2 * c], _mm256_loadu_ps(k + 16 * c), s0);
      s1 = _mm256_fmadd_ps(q[2 * c + 1], _mm256_loadu_ps(k + 16 * c + 8), s1);
    }
    scores[p] = scale * simd::hsum8(_mm256_add_ps(s0, s1));
  }
  vec::softmax(scores, len, level);
  __m256 acc[2 * C];
#pragma GCC unroll 16
  for (int j = 0; j < 2 * C; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < len; ++p) {
    const float* v = vb + row(p) * stride;
    const __m256 a = _mm256_set1_ps(scores[p]);
#pragma GCC unroll 16
    for (int j = 0; j < 2 * C; ++j) acc[j] = _mm256_fmadd_ps(a, _mm256_loadu_ps(v + 8 * j), acc[j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < 2 * C; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
}
#endif

// The fast kernel over any layout: row(p) is the cache row (in units of kv_stride) of position p.
template <class Row>
void attention_rows(const float* q, const float* k_cache, const float* v_cache, float* out,
                    int64_t T, int64_t start_pos, const AttentionShape& shape, float scale,
                    const Row& row) {
  const int64_t H = shape.q_heads, D = shape.head_dim, group = shape.q_heads / shape.kv_heads;
  const SimdLevel level = simd_level();
  ThreadPool::current().parallel_for_dynamic(T * H, 1, [&](int64_t i0, int64_t i1) {
    // Scores of one query against every position it sees, reused across this chunk's items.
    std::vector<float> scores(static_cast<size_t>(start_pos + T));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t t = item / H, h = item % H;
      const int64_t len = start_pos + t + 1;  // positions 0 ..= start_pos + t
      const float* qv = q + item * D;
      const float* kb = k_cache + (h / group) * D;
      const float* vb = v_cache + (h / group) * D;
      float* o = out + item * D;
#if PARALLM_X86
      if (level >= SimdLevel::Avx2 && D % 16 == 0 && D <= 128) {
        switch (D / 16) {
#define PARALLM_ATTEND(C)                                                                      \
  case C:                                                                                      \
    attend_avx2<C>(qv, kb, vb, shape.kv_stride, len, scale, row, scores.data(), o, level);     \
    continue;
          PARALLM_ATTEND(1)
          PARALLM_ATTEND(2)
          PARALLM_ATTEND(3)
          PARALLM_ATTEND(4)
          PARALLM_ATTEND(5)
          PARALLM_ATTEND(6)
          PARALLM_ATTEND(7)
          PARALLM_ATTEND(8)
#undef PARALLM_ATTEND
        }
      }
#endif
      for (int64_t p = 0; p < len; ++p)
        scores[p] = scale * vec::dot(qv, kb + row(p) * shape.kv_stride, D, level);
      vec::softmax(scores.data(), len, level);
      std::fill(o, o + D, 0.0f);
      for (int64_t p = 0; p < len; ++p)
        vec::axpy(scores[p], vb + row(p) * shape.kv_stride, o, D, level);
    }
  });
}

// The reference over any layout (double accumulation), row(p) as above.
template <class Row>
void attention_rows_ref(const float* q, const float* k_cache, const float* v_cache, float* out,
                        int64_t T, int64_t start_pos, const AttentionShape& shape, float scale,
                        const Row& row) {
  const int64_t H = shape.q_heads, D = shape.head_dim, group = shape.q_heads / shape.kv_heads;
  std::vector<double> s(static_cast<size_t>(start_pos + T));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const float* qv = q + (t * H + h) * D;  // q[t, h, :]
      const int64_t kvh = h / group;          // the KV head this query head reads
      const int64_t len = start_pos + t + 1;  // causal: positions 0 ..= start_pos + t
      double m = -INFINITY;
      for (int64_t p = 0; p < len; ++p) {
        const float* kv = k_cache + row(p) * shape.kv_stride + kvh * D;  // k[p, kvh, :]
        double d = 0;
        for (int64_t i = 0; i < D; ++i) d += static_cast<double>(qv[i]) * kv[i];
        s[p] = d * scale;
        m = std::max(m, s[p]);
      }
      double sum = 0;
      for (int64_t p = 0; p < len; ++p) {
        s[p] = std::exp(s[p] - m);
        sum += s[p];
      }
      float* o = out + (t * H + h) * D;  // out[t, h, :] = sum_p softmax_p * v[p, kvh, :]
      for (int64_t i = 0; i < D; ++i) {
        double acc = 0;
        for (int64_t p = 0; p < len; ++p)
          acc += s[p] * v_cache[row(p) * shape.kv_stride + kvh * D + i];
        o[i] = static_cast<float>(acc / sum);
      }
    }
  }
}

void check_paged(const PagedCache& c, const char* fn) {
  if (c.block_size <= 0 || c.k_pool == nullptr || c.v_pool == nullptr || c.block_table == nullptr)
    fail("attention", fn, ": a paged cache needs pools, a block table and block_size > 0 (got ",
         c.block_size, ")");
}

}  // namespace

void attention(const float* q, const float* k_cache, const float* v_cache, float* out, int64_t T,
               int64_t start_pos, const AttentionShape& shape, float scale) {
  check_shape(shape, T, start_pos, "attention");
  attention_rows(q, k_cache, v_cache, out, T, start_pos, shape, scale,
                 [](int64_t p) { return p; });
}

void attention_ref(const float* q, const float* k_cache, const float* v_cache, float* out,
                   int64_t T, int64_t start_pos, const AttentionShape& shape, float scale) {
  check_shape(shape, T, start_pos, "attention_ref");
  attention_rows_ref(q, k_cache, v_cache, out, T, start_pos, shape, scale,
                     [](int64_t p) { return p; });
}

void attention_paged(const float* q, const PagedCache& c, float* out, int64_t T,
                     int64_t start_pos, const AttentionShape& shape, float scale) {
  check_shape(shape, T, start_pos, "attention_paged");
  check_paged(c, "attention_paged");
  const int64_t bs = c.block_size;
  const int32_t* table = c.block_table;
  attention_rows(q, c.k_pool, c.v_pool, out, T, start_pos, shape, scale,
                 [=](int64_t p) { return static_cast<int64_t>(table[p / bs]) * bs + p % bs; });
}

void attention_paged_ref(const float* q, const PagedCache& c, float* out, int64_t T,
                         int64_t start_pos, const AttentionShape& shape, float scale) {
  check_shape(shape, T, start_pos, "attention_paged_ref");
  check_paged(c, "attention_paged_ref");
  const int64_t bs = c.block_size;
  const int32_t* table = c.block_table;
  attention_rows_ref(q, c.k_pool, c.v_pool, out, T, start_pos, shape, scale,
                     [=](int64_t p) { return static_cast<int64_t>(table[p / bs]) * bs + p % bs; });
}

}  // namespace parallm::kernels
