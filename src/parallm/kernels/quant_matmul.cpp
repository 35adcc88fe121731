// Quantized GEMV / GEMM (see quant_matmul.h).
//
// Work unit: a tile of R = 4 rows of W against one token; the tokens are the inner loop, so a
// tile's rows (K/32 blocks each: 4.25 KiB at K = 4096 for Q8_0) come from memory once and from
// L1/L2 for the later tokens. Rows are split statically over the pool (memory-bound, as the f32
// GEMV). The activations are quantized once per call by the calling thread.
#include "parallm/kernels/quant_matmul.h"

#include <cblas.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <type_traits>

#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/matmul.h"
#include "parallm/kernels/simd.h"

#if PARALLM_X86
#define PARALLM_AVXVNNI __attribute__((target("avxvnni,avx2,fma,f16c")))
#define PARALLM_AVX512VNNI \
  __attribute__((target("avx512vnni,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace parallm::kernels {

using quant::BlockQ4_0;
using quant::BlockQ8_0;

namespace {

constexpr int kRows = 4;  // rows of W per tile

// One token's activations, quantized: the Q8_0 blocks, their scales as f32, and 8 x the sum of
// each block's codes (Q4_0's kernels multiply the unsigned codes 0..15 and subtract 8 x sum(x)
// once per block instead of re-centring every code).
struct Act {
  const BlockQ8_0* q;
  const float* d;
  const int32_t* sum8;
};

// ---- plain reference: exact integer sums per block, scaled in f32.
template <class WB>
inline int block_isum(const WB& w, const BlockQ8_0& x) {
  int s = 0;
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    for (int j = 0; j < 32; ++j) s += static_cast<int>(w.qs[j]) * x.qs[j];
  } else {
    for (int j = 0; j < 16; ++j) {
      s += ((w.qs[j] & 0xF) - 8) * static_cast<int>(x.qs[j]);
      s += ((w.qs[j] >> 4) - 8) * static_cast<int>(x.qs[j + 16]);
    }
  }
  return s;
}

template <class WB>
void tile_scalar(const WB* const* w, int rows, const Act& x, int64_t nb, float* out) {
  for (int r = 0; r < rows; ++r) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b)
      acc += f16_to_f32(w[r][b].d) * f16_to_f32(x.q[b].d) *
             static_cast<float>(block_isum(w[r][b], x.q[b]));
    out[r] = acc;
  }
}

#if PARALLM_X86
// Q4_0's 32 codes as unsigned bytes 0..15: low nibbles are values 0..15, high nibbles 16..31.
PARALLM_AVX2 static inline __m256i nibbles_avx2(const BlockQ4_0& w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m), _mm_and_si128(raw, m));
}

// The 8 i32 lanes whose sum is one block's integer dot product. Q8_0: maddubs needs an unsigned
// operand, so |w| and x with w's sign (|w| <= 128, |x| <= 127: the i16 pair sums stay below
// 2 x 128 x 127 < 32767). Q4_0: the codes are unsigned already (pair sums <= 2 x 15 x 127);
// 8 x sum(x) is subtracted in lane 0.
template <class WB>
PARALLM_AVX2 static inline __m256i block_dot_avx2(const WB& w, __m256i xv, int32_t sum8) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    (void)sum8;
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
    return _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
  } else {
    const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles_avx2(w), xv), ones);
    return _mm256_sub_epi32(s, _mm256_setr_epi32(sum8, 0, 0, 0, 0, 0, 0, 0));
  }
}

// Software prefetch a fixed distance ahead in each of a tile's rows, about once a cache line (as
// the bf16 GEMV does, kernels/matmul.cpp): four interleaved rows of 34- or 18-byte blocks are more
// streams than the hardware prefetcher keeps far enough ahead at decode's bandwidth.
constexpr int64_t kPrefetchBytes = 1024;
template <class WB>
constexpr int64_t kPrefetchEvery = sizeof(WB) >= 64 ? 1 : 64 / sizeof(WB);
template <class WB>
static inline void prefetch_tile(const WB* const* w, int64_t b) {
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(w[r] + b) + kPrefetchBytes, _MM_HINT_T0);
}

template <class WB>
PARALLM_AVX2 void tile_avx2(const WB* const* w, int rows, const Act& x, int64_t nb, float* out) {
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  if (rows == kRows) {
    for (int64_t b = 0; b < nb; ++b) {
      if (b % kPrefetchEvery<WB> == 0) prefetch_tile(w, b);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q[b].qs));
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m256 s = _mm256_cvtepi32_ps(block_dot_avx2(w[r][b], xv, x.sum8[b]));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[r][b].d) * x.d[b]), s, acc[r]);
      }
    }
  } else {
    for (int r = 0; r < rows; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q[b].qs));
        const __m256 s = _mm256_cvtepi32_ps(block_dot_avx2(w[r][b], xv, x.sum8[b]));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[r][b].d) * x.d[b]), s, acc[r]);
      }
  }
  for (int r = 0; r < rows; ++r) out[r] = simd::hsum8(acc[r]);
}

// 4 rows x 2 tokens (batched decoding, small prompt chunks): each weight block is loaded, its
// sign or nibbles taken and its scale converted once for both tokens.
template <class WB>
PARALLM_AVX2 void tile2_avx2(const WB* const* w, const Act* x, int64_t nb, float (*out)[kRows]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2][kRows];
  for (int t = 0; t < 2; ++t)
    for (int r = 0; r < kRows; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (b % kPrefetchEvery<WB> == 0) prefetch_tile(w, b);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[0].q[b].qs));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[1].q[b].qs));
    const float d0 = x[0].d[b], d1 = x[1].d[b];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      __m256i s0, s1;
      if constexpr (std::is_same_v<WB, BlockQ8_0>) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r][b].qs));
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x0, wv)), ones);
        s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x1, wv)), ones);
      } else {
        const __m256i q = nibbles_avx2(w[r][b]);
        s0 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q, x0), ones),
                              _mm256_setr_epi32(x[0].sum8[b], 0, 0, 0, 0, 0, 0, 0));
        s1 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q, x1), ones),
                              _mm256_setr_epi32(x[1].sum8[b], 0, 0, 0, 0, 0, 0, 0));
      }
      const float dw = _cvtsh_ss(w[r][b].d);
      acc[0][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d0), _mm256_cvtepi32_ps(s0), acc[0][r]);
      acc[1][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d1), _mm256_cvtepi32_ps(s1), acc[1][r]);
    }
  }
  for (int t = 0; t < 2; ++t)
    for (int r = 0; r < kRows; ++r) out[t][r] = simd::hsum8(acc[t][r]);
}

// AVX-VNNI: vpdpbusd sums the four u8 x s8 products per 32-bit lane in one instruction, without
// the i16 intermediate.
PARALLM_AVXVNNI static inline __m256i nibbles_vnni(const BlockQ4_0& w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m), _mm_and_si128(raw, m));
}

template <class WB>
PARALLM_AVXVNNI static inline __m256i block_dot_vnni(const WB& w, __m256i xv, int32_t sum8) {
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    (void)sum8;
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv),
                                   _mm256_sign_epi8(xv, wv));
  } else {
    return _mm256_dpbusd_avx_epi32(_mm256_setr_epi32(-sum8, 0, 0, 0, 0, 0, 0, 0), nibbles_vnni(w),
                                   xv);
  }
}

template <class WB>
PARALLM_AVXVNNI void tile_avxvnni(const WB* const* w, int rows, const Act& x, int64_t nb,
                                  float* out) {
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  const int step = rows == kRows ? kRows : 1;
  for (int r0 = 0; r0 < rows; r0 += step) {
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q[b].qs));
#pragma GCC unroll 4
      for (int i = 0; i < step; ++i) {
        const int r = r0 + i;
        const __m256 s = _mm256_cvtepi32_ps(block_dot_vnni(w[r][b], xv, x.sum8[b]));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[r][b].d) * x.d[b]), s, acc[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) out[r] = simd::hsum8(acc[r]);
}

// AVX-512 VNNI: two blocks per 512-bit register (blocks b and b+1 of one row); Q8_0's |w| by
// vpabsb and x negated where w < 0 by a masked subtract (AVX-512 has no vpsignb); Q4_0's
// unsigned codes with 8 x sum(x) subtracted in lanes 0 and 8.
PARALLM_AVX512VNNI static inline __m512i pair512(__m256i a, __m256i b) {
  // Masked forms: GCC 12's unmasked ones pass an "undefined" register -Wuninitialized sees.
  return _mm512_mask_broadcast_i64x4(_mm512_maskz_broadcast_i64x4(0x0F, a), 0xF0, b);
}

PARALLM_AVX512VNNI static inline __m256i nibbles_512(const BlockQ4_0& w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m), _mm_and_si128(raw, m));
}

template <class WB>
PARALLM_AVX512VNNI static inline __m512i pair_dot_512(const WB& w0, const WB& w1, __m512i xv,
                                                      int32_t s0, int32_t s1) {
  const __m512i zero = _mm512_setzero_si512();
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    (void)s0;
    (void)s1;
    const __m512i wv = pair512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0.qs)),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1.qs)));
    const __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv);
    return _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), sx);
  } else {
    const __m512i init = _mm512_setr_epi32(-s0, 0, 0, 0, 0, 0, 0, 0, -s1, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_dpbusd_epi32(init, pair512(nibbles_512(w0), nibbles_512(w1)), xv);
  }
}

template <class WB>
PARALLM_AVX512VNNI static inline __m256i block_dot_512(const WB& w, __m256i xv, int32_t sum8) {
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    (void)sum8;
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv),
                               _mm256_sign_epi8(xv, wv));
  } else {
    return _mm256_dpbusd_epi32(_mm256_setr_epi32(-sum8, 0, 0, 0, 0, 0, 0, 0), nibbles_512(w), xv);
  }
}

template <class WB>
PARALLM_AVX512VNNI void tile_avx512vnni(const WB* const* w, int rows, const Act& x, int64_t nb,
                                        float* out) {
  __m512 acc[kRows];
  __m256 tail[kRows];
  for (int r = 0; r < kRows; ++r) {
    acc[r] = _mm512_setzero_ps();
    tail[r] = _mm256_setzero_ps();
  }
  const int step = rows == kRows ? kRows : 1;
  for (int r0 = 0; r0 < rows; r0 += step) {
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      const __m512i xv =
          pair512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q[b].qs)),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q[b + 1].qs)));
#pragma GCC unroll 4
      for (int i = 0; i < step; ++i) {
        const int r = r0 + i;
        const __m512i p = pair_dot_512(w[r][b], w[r][b + 1], xv, x.sum8[b], x.sum8[b + 1]);
        const __m512 sc =
            _mm512_maskz_insertf32x8(simd::kAll16, _mm512_set1_ps(_cvtsh_ss(w[r][b].d) * x.d[b]),
                                     _mm256_set1_ps(_cvtsh_ss(w[r][b + 1].d) * x.d[b + 1]), 1);
        acc[r] = _mm512_fmadd_ps(sc, _mm512_maskz_cvtepi32_ps(simd::kAll16, p), acc[r]);
      }
    }
    for (; b < nb; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q[b].qs));
      for (int i = 0; i < step; ++i) {
        const int r = r0 + i;
        const __m256 s = _mm256_cvtepi32_ps(block_dot_512(w[r][b], xv, x.sum8[b]));
        tail[r] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[r][b].d) * x.d[b]), s, tail[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) out[r] = simd::hsum16(acc[r]) + simd::hsum8(tail[r]);
}
#endif  // PARALLM_X86

// ---- K formats (Q4_K, Q5_K, Q6_K) against BlockQ8_K activations (256 values, f32 scale, codes
// |x| <= 127, sums of 16 codes). Per (weight super-block, activation block) pair the kernels form
// exact int32 sums; only then are they scaled in f32. Both paths produce the same integers and
// combine them with the same f32 operations in the same order (explicit fma, so the compiler
// cannot contract differently in the two), so their results are bit-identical.
//
// Q4_K and Q5_K (value = d sc_j q - dmin m_j, q in 0..15 or 0..31, sc_j and m_j in 0..63,
// sub-blocks j of 32):
//   dot = d dx sum_j sc_j sum_{i in j} q_i x_i  -  dmin dx sum_j m_j sum_{i in j} x_i
// Q6_K (value = d sc_g (q - 32), q in 0..63, sc_g int8, sub-blocks g of 16):
//   dot = d dx (sum_g sc_g sum_{i in g} q_i x_i  -  32 sum_g sc_g sum_{i in g} x_i)
// int32 bounds: Q4_K |first sum| <= 256 x 63 x 15 x 127 = 30.7e6 (Q5_K: x 31 = 63.5e6), |second|
// <= 256 x 63 x 127 = 2.0e6; Q6_K |first| <= 256 x 128 x 63 x 127 = 262e6, |second| <= 32 x 256 x
// 128 x 127 = 133e6, their difference <= 395e6: all below 2^31 = 2147e6 (partial sums are bounded
// by the same products over fewer values).
// Q6_K repacked (repack_quant_weight): per super-block index the 4 rows' plain blocks side by
// side, so a tile of 4 rows reads one stream (four streams of 210-byte blocks at once run slower
// than one row after another, see krows_avx2). The blocks themselves are unchanged.
struct GroupQ6_K {
  quant::BlockQ6_K blk[4];
};
// The K formats with mins (Q4_K, Q5_K: d, dmin and the 12 scale bytes at the same offsets).
template <class WB>
constexpr bool kHasMins =
    std::is_same_v<WB, quant::BlockQ4_K> || std::is_same_v<WB, quant::BlockQ5_K>;

struct KSum {
  int32_t q;  // sum of scale x code x activation
  int32_t m;  // Q4_K, Q5_K: sum of min x activation (0 for Q6_K)
};

// Q4_K's 6-bit scales and mins of its 8 sub-blocks: bytes 0..3 hold sc_0..3 in their low 6 bits,
// bytes 4..7 m_0..3; sub-blocks 4..7 take their low 4 bits from the nibbles of bytes 8..11 and
// their high 2 bits from the top bits of bytes 0..3 (scales) and 4..7 (mins).
inline void q4k_scales_mins(const uint8_t* p, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = p[j] & 63;
    m[j] = p[j + 4] & 63;
    sc[j + 4] = static_cast<uint8_t>((p[j + 8] & 0xF) | ((p[j] >> 6) << 4));
    m[j + 4] = static_cast<uint8_t>((p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4));
  }
}

// sum_j m_j x (codes summed over sub-block j of 32 = two groups of 16)
inline int32_t q4k_min_sum(const uint8_t* m, const quant::BlockQ8_K& x) {
  int32_t s = 0;
  for (int j = 0; j < 8; ++j) s += m[j] * (x.bsums[2 * j] + x.bsums[2 * j + 1]);
  return s;
}

// acc + d dx q - dmin dx m, from the weight block's scales already in f32 (the paths convert f16
// their own way: f16_to_f32 or _cvtsh_ss, both exact).
inline float kcombine(float d, float dmin, float dx, KSum s, float acc) {
  acc = std::fma(d * dx, static_cast<float>(s.q), acc);
  return std::fma(-(dmin * dx), static_cast<float>(s.m), acc);
}
inline float kcombine(float d, float dx, KSum s, float acc) {
  return std::fma(d * dx, static_cast<float>(s.q), acc);
}
template <class WB, std::enable_if_t<kHasMins<WB>, int> = 0>
inline float kcombine_scalar(const WB& w, const quant::BlockQ8_K& x, KSum s, float acc) {
  return kcombine(f16_to_f32(w.d), f16_to_f32(w.dmin), x.d, s, acc);
}
inline float kcombine_scalar(const quant::BlockQ6_K& w, const quant::BlockQ8_K& x, KSum s,
                             float acc) {
  return kcombine(f16_to_f32(w.d), x.d, s, acc);
}

// The plain reference, code by code in the layout's own terms. Q4_K, Q5_K: 32 bytes of nibbles
// per pair of sub-blocks, 2c in the low nibbles, 2c + 1 in the high; Q5_K's bit j of qh[l] is bit
// 4 of value l of sub-block j.
template <class WB, std::enable_if_t<kHasMins<WB>, int> = 0>
inline KSum ksum_scalar(const WB& w, const quant::BlockQ8_K& x) {
  auto high = [&](int l, int j) -> int {
    if constexpr (std::is_same_v<WB, quant::BlockQ5_K>) return ((w.qh[l] >> j) & 1) << 4;
    (void)l;
    (void)j;
    return 0;
  };
  uint8_t sc[8], m[8];
  q4k_scales_mins(w.scales, sc, m);
  int32_t q = 0;
  for (int c = 0; c < 4; ++c) {
    int32_t lo = 0, hi = 0;
    for (int l = 0; l < 32; ++l) {
      const int q0 = (w.qs[32 * c + l] & 0xF) | high(l, 2 * c);
      const int q1 = (w.qs[32 * c + l] >> 4) | high(l, 2 * c + 1);
      lo += q0 * static_cast<int32_t>(x.qs[64 * c + l]);
      hi += q1 * static_cast<int32_t>(x.qs[64 * c + 32 + l]);
    }
    q += sc[2 * c] * lo + sc[2 * c + 1] * hi;
  }
  return {q, q4k_min_sum(m, x)};
}

inline KSum ksum_scalar(const quant::BlockQ6_K& w, const quant::BlockQ8_K& x) {
  int32_t q = 0;
  // Each half of 128 values: 64 bytes of low nibbles (values l and l + 64 in byte l, values
  // l + 32 and l + 96 in byte l + 32) and 32 bytes of high 2-bit pairs (value l + 32 i in bits
  // 2i, 2i + 1 of byte l).
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = w.ql + 64 * h;
    const uint8_t* qh = w.qh + 32 * h;
    const int8_t* xq = x.qs + 128 * h;
    int32_t g[8] = {};  // per group of 16 within the half
    for (int l = 0; l < 32; ++l) {
      const int q0 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
      const int q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      g[l / 16] += q0 * xq[l];
      g[2 + l / 16] += q1 * xq[l + 32];
      g[4 + l / 16] += q2 * xq[l + 64];
      g[6 + l / 16] += q3 * xq[l + 96];
    }
    for (int i = 0; i < 8; ++i) q += w.scales[8 * h + i] * g[i];
  }
  return {q, 0};
}

template <class WB>
void ktile_scalar(const WB* const* w, int rows, const quant::BlockQ8_K* x, int64_t nb,
                  float* out) {
  for (int r = 0; r < rows; ++r) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b)
      acc = kcombine_scalar(w[r][b], x[b], ksum_scalar(w[r][b], x[b]), acc);
    out[r] = acc;
  }
}

#if PARALLM_X86
PARALLM_AVX2 static inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Bit `bit` of each byte of v as bit 4 (0x10) of the same byte, other bits 0 (16-bit shifts: the
// bit that lands on bit 4 of either byte came from that byte).
template <int bit>
PARALLM_AVX2 static inline __m256i bit_to_4(__m256i v) {
  const __m256i b4 = _mm256_set1_epi8(0x10);
  if constexpr (bit <= 4)
    return _mm256_and_si256(_mm256_slli_epi16(v, 4 - bit), b4);
  else
    return _mm256_and_si256(_mm256_srli_epi16(v, bit - 4), b4);
}

// Q4_K: maddubs(codes 0..15 unsigned, x signed) -> i16 pair sums, |.| <= 2 x 15 x 127 = 3810 (no
// saturation); madd with the sub-block's scale (<= 63) -> i32 lanes <= 63 x 2 x 3810. Q5_K the
// same with each code's fifth bit (bit j of qh[l] for value l of sub-block j) ORed in as bit 4:
// codes 0..31, pair sums <= 7874. The scales
// and mins are unpacked 4 at a time with 32-bit masks (the packing q4k_scales_mins reads byte by
// byte; the reference's bit-identical results check the two against each other). NT tokens (1 or
// 2) share the weight block's unpacking.
// The unreduced form: per token, 8 int32 lanes whose sum is KSum::q (q[t]) and 8 whose sum is
// KSum::m (m[t]); ksum_avx2 reduces them one row at a time, ktile4_avx2 four rows at once.
// Chunk C's codes (sub-blocks 2C in lo, 2C + 1 in hi) as bytes.
template <int C, class WB>
PARALLM_AVX2 static inline void kcodes_avx2(const WB& w, __m256i* lo, __m256i* hi) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs + 32 * C));
  *lo = _mm256_and_si256(raw, low4);
  *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
  if constexpr (std::is_same_v<WB, quant::BlockQ5_K>) {
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qh));
    *lo = _mm256_or_si256(*lo, bit_to_4<2 * C>(qh));
    *hi = _mm256_or_si256(*hi, bit_to_4<2 * C + 1>(qh));
  }
}

template <int C, int NT>
PARALLM_AVX2 static inline void kchunk_avx2(__m256i lo, __m256i hi, __m256i sc16,
                                            const quant::BlockQ8_K* const* x, __m256i* acc) {
  const __m256i s0 = _mm256_shuffle_epi8(
      sc16, _mm256_set1_epi16(static_cast<short>((4 * C) | ((4 * C + 1) << 8))));
  const __m256i s1 = _mm256_shuffle_epi8(
      sc16, _mm256_set1_epi16(static_cast<short>((4 * C + 2) | ((4 * C + 3) << 8))));
  for (int t = 0; t < NT; ++t) {
    const int8_t* xq = x[t]->qs + 64 * C;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
    const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), s0);
    const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), s1);
    acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(p0, p1));
  }
}

template <int C, int NT, class WB>
PARALLM_AVX2 static inline void kchunks_avx2(const WB& w, __m256i sc16,
                                             const quant::BlockQ8_K* const* x, __m256i* acc) {
  __m256i lo, hi;
  kcodes_avx2<C>(w, &lo, &hi);
  kchunk_avx2<C, NT>(lo, hi, sc16, x, acc);
  if constexpr (C < 3) kchunks_avx2<C + 1, NT>(w, sc16, x, acc);
}

template <int NT, class WB, std::enable_if_t<kHasMins<WB>, int> = 0>
PARALLM_AVX2 static inline void ksum_lanes_avx2(const WB& w, const quant::BlockQ8_K* const* x,
                                                __m256i* q, __m256i* m) {
  uint32_t p[3];
  std::memcpy(p, w.scales, 12);
  const uint32_t sc_lo = p[0] & 0x3F3F3F3Fu, m_lo = p[1] & 0x3F3F3F3Fu;
  // Shifts across byte boundaries bring in only bits the masks clear.
  const uint32_t sc_hi = (p[2] & 0x0F0F0F0Fu) | ((p[0] >> 2) & 0x30303030u);
  const uint32_t m_hi = ((p[2] >> 4) & 0x0F0F0F0Fu) | ((p[1] >> 2) & 0x30303030u);
  // bytes 0..7: sc_0..7, bytes 8..15: m_0..7
  const __m128i scm = _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi),
                                     static_cast<int>(m_lo), static_cast<int>(m_hi));
  // The 8 scales as i16 in both 128-bit halves; sub-block j's scale spread to every i16 lane by
  // a byte shuffle of lane j.
  const __m256i sc16 = _mm256_permute4x64_epi64(_mm256_cvtepu8_epi16(scm), 0x44);
  __m256i acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
  kchunks_avx2<0, NT>(w, sc16, x, acc);  // chunks c = 0..3: sub-blocks 2c, 2c + 1
  // Mins: each m_j twice as i16 (lanes 2j, 2j + 1) against the 16 group sums: i32 lane j =
  // m_j x sum of sub-block j's codes (|.| <= 63 x 32 x 127).
  const __m128i dup = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  const __m256i m16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scm, dup));
  for (int t = 0; t < NT; ++t) {
    q[t] = acc[t];
    m[t] = _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t]->bsums)),
                             m16);
  }
}

template <int NT, class WB, std::enable_if_t<kHasMins<WB>, int> = 0>
PARALLM_AVX2 static inline void ksum_avx2(const WB& w, const quant::BlockQ8_K* const* x,
                                          KSum* out) {
  __m256i q[NT], m[NT];
  ksum_lanes_avx2<NT>(w, x, q, m);
  for (int t = 0; t < NT; ++t) {
    // Both horizontal sums at once: [a01 a23 m01 m23 | a45 a67 m45 m67] -> [A, M, A, M].
    const __m256i h = _mm256_hadd_epi32(q[t], m[t]);
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    r = _mm_hadd_epi32(r, r);
    out[t] = {_mm_cvtsi128_si32(r), _mm_extract_epi32(r, 1)};
  }
}

// Q6_K: the 6-bit codes rebuilt as unsigned bytes 0..63 (low nibble | high pair << 4), then
// maddubs against x: i16 pair sums |.| <= 2 x 63 x 127 = 16002 < 32767 (no saturation); madd with
// the group scales (int8 widened, |sc| <= 128) -> i32 lanes <= 2 x 16002 x 128. The offset of 32
// comes off once per block as 32 x sum_g sc_g bsum_g (madd of the scales with the group sums,
// |.| <= 2 x 128 x 2032 per lane). NT tokens (1 or 2) share the codes' reconstruction.
template <int NT>
PARALLM_AVX2 static inline void ksum_lanes_avx2(const quant::BlockQ6_K& w,
                                                const quant::BlockQ8_K* const* x, __m256i* q,
                                                __m256i* m) {
  (void)m;  // Q6_K has no mins
  const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
  const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales));
  // The scales as i16, the even ones in the low 128-bit half and the odd ones in the high half:
  // chunk (h, k) wants 8 x scale a in its low half (maddubs's i16 lanes 0..7, the chunk's first 16
  // values) and 8 x scale a + 1 in its high half (a = 8h + 2k), one in-lane byte shuffle of
  // i16 lane a / 2 in both halves.
  const __m256i sc_eo = _mm256_cvtepi8_epi16(
      _mm_shuffle_epi8(sc8, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)));
  __m256i acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.ql + 64 * h));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.ql + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qh + 32 * h));
    // 16-bit shifts move bits across the byte boundary only into bits the masks clear.
    const __m256i q[4] = {
        _mm256_or_si256(_mm256_and_si256(l0, low4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45)),
        _mm256_or_si256(_mm256_and_si256(l1, low4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), bits45)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                        _mm256_and_si256(qh, bits45)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45))};
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const int e = 4 * h + k;  // i16 lane of scales 2e (low half) and 2e + 1 (high half)
      const __m256i s16 = _mm256_shuffle_epi8(
          sc_eo, _mm256_set1_epi16(static_cast<short>((2 * e) | ((2 * e + 1) << 8))));
      for (int t = 0; t < NT; ++t) {
        const __m256i xv =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t]->qs + 128 * h + 32 * k));
        acc[t] =
            _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], xv), s16));
      }
    }
  }
  const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
  for (int t = 0; t < NT; ++t) {
    const __m256i off = _mm256_madd_epi16(
        sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t]->bsums)));
    q[t] = _mm256_sub_epi32(acc[t], _mm256_slli_epi32(off, 5));
  }
}

template <int NT>
PARALLM_AVX2 static inline void ksum_avx2(const quant::BlockQ6_K& w,
                                          const quant::BlockQ8_K* const* x, KSum* out) {
  __m256i q[NT];
  ksum_lanes_avx2<NT>(w, x, q, nullptr);
  for (int t = 0; t < NT; ++t) out[t] = {hsum_i32(q[t]), 0};
}

// The 4 rows' lane sums in one go: [sum v0, sum v1, sum v2, sum v3] (int32 adds, exact in any
// order, so each equals hsum_i32 of its vector).
PARALLM_AVX2 static inline __m128i hsum4_i32(const __m256i* v) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// The 4 rows' f16 scales of block b as f32 (exact, as _cvtsh_ss): d, and dmin for Q4_K / Q5_K.
template <class WB, std::enable_if_t<kHasMins<WB>, int> = 0>
PARALLM_AVX2 static inline void kscales4(const WB* const* w, int64_t b, __m128* d, __m128* dmin) {
  uint32_t dd[kRows];
  for (int r = 0; r < kRows; ++r) std::memcpy(&dd[r], &w[r][b].d, 4);  // d, dmin adjacent
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dd)));
  const __m128 lo = _mm256_castps256_ps128(f), hi = _mm256_extractf128_ps(f, 1);
  *d = _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
  *dmin = _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
}
PARALLM_AVX2 static inline void kscales4(const quant::BlockQ6_K* const* w, int64_t b, __m128* d,
                                         __m128* dmin) {
  (void)dmin;
  *d = _mm_cvtph_ps(_mm_setr_epi16(static_cast<short>(w[0][b].d), static_cast<short>(w[1][b].d),
                                   static_cast<short>(w[2][b].d), static_cast<short>(w[3][b].d),
                                   0, 0, 0, 0));
}
// Q6_K groups (GroupQ6_K): row r's block b at g[b].blk[r].
PARALLM_AVX2 static inline void kscales4(const GroupQ6_K* g, int64_t b, __m128* d, __m128* dmin) {
  const quant::BlockQ6_K* rows[kRows] = {g[b].blk, g[b].blk + 1, g[b].blk + 2, g[b].blk + 3};
  kscales4(rows, 0, d, dmin);
}

// acc[t] (lane r: row r) += the 4 rows' block sums, as kcombine does for each row.
template <bool kMins, int NT>
PARALLM_AVX2 static inline void kcombine4(__m128 d, __m128 dmin,
                                          const quant::BlockQ8_K* const* xb,
                                          const __m256i (*q)[kRows], const __m256i (*m)[kRows],
                                          __m128* acc) {
  for (int t = 0; t < NT; ++t) {
    const __m128 dx = _mm_set1_ps(xb[t]->d);
    acc[t] = _mm_fmadd_ps(_mm_mul_ps(d, dx), _mm_cvtepi32_ps(hsum4_i32(q[t])), acc[t]);
    if constexpr (kMins)
      acc[t] = _mm_fnmadd_ps(_mm_mul_ps(dmin, dx), _mm_cvtepi32_ps(hsum4_i32(m[t])), acc[t]);
  }
}

template <class WB, std::enable_if_t<kHasMins<WB>, int> = 0>
PARALLM_AVX2 static inline float kcombine_avx2(const WB& w, const quant::BlockQ8_K& x, KSum s,
                                               float acc) {
  return kcombine(_cvtsh_ss(w.d), _cvtsh_ss(w.dmin), x.d, s, acc);
}
PARALLM_AVX2 static inline float kcombine_avx2(const quant::BlockQ6_K& w, const quant::BlockQ8_K& x,
                                               KSum s, float acc) {
  return kcombine(_cvtsh_ss(w.d), x.d, s, acc);
}

// `rows` rows x NT tokens (1 or 2), one row at a time: each block's sums (ksum_avx2) combined as
// kcombine does, bit-identical to ktile_scalar. Q6_K's plain rows always run this way: with its
// 210-byte blocks, four row streams at once (ktile4_avx2, prefetched) decoded at 9.5-10.2 tok/s on
// a Zen 3 (2 threads, the tinyllama shape) against 16.2-16.7 one row after another
// (docs/benchmarks.md); repacked, the 4 rows' blocks lie side by side and ktile4_avx2 runs.
template <class WB, int NT>
PARALLM_AVX2 void krows_avx2(const WB* const* w, int rows, const quant::BlockQ8_K* const* x,
                             int64_t nb, float (*out)[kRows]) {
  for (int r = 0; r < rows; ++r) {
    float acc[NT] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const quant::BlockQ8_K* xb[NT];
      for (int t = 0; t < NT; ++t) xb[t] = x[t] + b;
      KSum s[NT];
      ksum_avx2<NT>(w[r][b], xb, s);
      for (int t = 0; t < NT; ++t) acc[t] = kcombine_avx2(w[r][b], *xb[t], s[t], acc[t]);
    }
    for (int t = 0; t < NT; ++t) out[t][r] = acc[t];
  }
}

// 4 rows x NT tokens (1 or 2): each row's lanes as ksum_lanes_avx2 forms them, the four rows
// reduced together and combined 4 at a time in f32: lane r takes kcombine's operations in its order
// (d x dx, then fma with the q sum, then fma with -(dmin x dx) and the m sum), so each output is
// bit-identical to ktile_scalar's. Weights are the 4 row streams, prefetched ahead.
// W: the 4 rows' plain block pointers (const WB* const*: four streams, prefetched), or a Q6_K
// group array (const GroupQ6_K*: the 4 rows' blocks side by side, one stream).
template <class WB, int NT, class W>
PARALLM_AVX2 void ktile4_avx2(W w, const quant::BlockQ8_K* const* x, int64_t nb,
                              float (*out)[kRows]) {
  constexpr bool kMins = kHasMins<WB>;
  constexpr bool kGroup = std::is_same_v<W, const GroupQ6_K*>;
  if constexpr (!kMins && !kGroup) return krows_avx2<WB, NT>(w, kRows, x, nb, out);
  auto block = [&](int r, int64_t b) -> const WB& {
    if constexpr (kGroup)
      return w[b].blk[r];
    else
      return w[r][b];
  };
  __m128 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if constexpr (kGroup) {
      const char* ahead = reinterpret_cast<const char*>(w + b + 2);
      for (size_t l = 0; l < sizeof(GroupQ6_K); l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
    } else {
      for (int r = 0; r < kRows; ++r) {
        const char* ahead = reinterpret_cast<const char*>(w[r] + b) + 8 * sizeof(WB);
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        _mm_prefetch(ahead + 128, _MM_HINT_T0);
        if constexpr (sizeof(WB) > 192) _mm_prefetch(ahead + 192, _MM_HINT_T0);
      }
    }
    const quant::BlockQ8_K* xb[NT];
    for (int t = 0; t < NT; ++t) xb[t] = x[t] + b;
    __m256i q[NT][kRows], m[NT][kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      __m256i qr[NT], mr[NT];
      ksum_lanes_avx2<NT>(block(r, b), xb, qr, mr);
      for (int t = 0; t < NT; ++t) {
        q[t][r] = qr[t];
        if constexpr (kMins) m[t][r] = mr[t];
      }
    }
    __m128 d, dmin;
    kscales4(w, b, &d, &dmin);
    kcombine4<kMins, NT>(d, dmin, xb, q, m, acc);
  }
  for (int t = 0; t < NT; ++t) _mm_storeu_ps(out[t], acc[t]);
}

template <class WB>
PARALLM_AVX2 void ktile_avx2(const WB* const* w, int rows, const quant::BlockQ8_K* x, int64_t nb,
                             float* out) {
  float o[1][kRows];
  if (rows == kRows)
    ktile4_avx2<WB, 1>(w, &x, nb, o);
  else
    krows_avx2<WB, 1>(w, rows, &x, nb, o);
  for (int r = 0; r < rows; ++r) out[r] = o[0][r];
}

#endif  // PARALLM_X86

// AVX-VNNI and AVX-512 VNNI run the AVX2 kernel for the K formats (no vpdpbusd variant yet).
template <class WB>
using KTileFn = void (*)(const WB* const*, int, const quant::BlockQ8_K*, int64_t, float*);

template <class WB>
KTileFn<WB> ktile_for(QuantPath p) {
#if PARALLM_X86
  if (p != QuantPath::Scalar) return &ktile_avx2<WB>;
#endif
  (void)p;
  return &ktile_scalar<WB>;
}

template <class WB>
using TileFn = void (*)(const WB* const*, int, const Act&, int64_t, float*);

template <class WB>
TileFn<WB> tile_for(QuantPath p) {
  switch (p) {
#if PARALLM_X86
    case QuantPath::Avx2:
      return &tile_avx2<WB>;
    case QuantPath::AvxVnni:
      return &tile_avxvnni<WB>;
    case QuantPath::Avx512Vnni:
      return &tile_avx512vnni<WB>;
#endif
    default:
      return &tile_scalar<WB>;
  }
}

struct CpuVnni {
  bool avxvnni = false, avx512vnni = false;
};
CpuVnni detect_vnni() {
  CpuVnni v;
#if PARALLM_X86
  __builtin_cpu_init();
  const bool avx512 = cpu_simd_level() == SimdLevel::Avx512;
  v.avx512vnni = avx512 && __builtin_cpu_supports("avx512vnni") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  v.avxvnni = cpu_simd_level() >= SimdLevel::Avx2 && cpu_has_avxvnni();
#endif
  return v;
}
const CpuVnni& vnni() {
  static const CpuVnni v = detect_vnni();
  return v;
}

// ---- Repacked Q4_0 / Q8_0 (repack_quant_weight, docs/quantization.md): rows in groups of
// kRows; per 32-column block index one group block holding the group's 4 f16 scales together,
// then its codes. Same bytes as the plain layout (4 x 18 = 8 + 64, 4 x 34 = 8 + 128), so rows
// 4g..4g+3 keep their byte range and the N % 4 tail rows stay plain where they were.
//
// Q4_0: byte j of qs[p] holds row 2p's code j (0..15) in its low nibble and row 2p + 1's in its
// high nibble, codes in column order (the plain block's low nibbles are columns 0..15, its high
// nibbles 16..31): one 32-byte load, one mask and one shift give two rows' codes in the order
// nibbles_avx2 builds them for one, so the int32 lanes, and every f32 operation on them, are the
// plain kernel's.
struct GroupQ4_0 {
  uint16_t d[kRows];
  uint8_t qs[kRows / 2][32];
};
struct GroupQ8_0 {
  uint16_t d[kRows];
  int8_t qs[kRows][32];
};
static_assert(sizeof(GroupQ4_0) == kRows * sizeof(BlockQ4_0));
static_assert(sizeof(GroupQ8_0) == kRows * sizeof(BlockQ8_0));

template <class WB>
using GroupOf = std::conditional_t<std::is_same_v<WB, BlockQ8_0>, GroupQ8_0, GroupQ4_0>;

// Q4_K: per 256-column super-block index one group block of 4 rows, same bytes as 4 plain blocks
// (16 + 48 + 512 = 4 x 144): the 4 rows' d then dmin (one 16-byte load, one conversion), word i
// of each row's 12 scale bytes side by side (the 6-bit unpacking runs on all 4 rows in one
// 128-bit register), then each row's 128 code bytes, reordered within each 64-value chunk.
//
// The reorder: chunk c holds sub-blocks a = 2c and b = 2c + 1 (32 values each; plain: a in the
// low nibbles, b in the high). Repacked, its 64 codes are in the order vpunpck{l,h}wd give when
// they interleave a's and b's bytes two at a time (k4_source below): pairs of a and pairs of b
// alternate, so after vpmaddubsw the int16 lanes alternate a, b, a, b and one vpmaddwd against
// the dword (sc_a, sc_b) scales them both, for the low and the high nibbles alike. The codes
// meet activations reordered the same way (k4_reorder_activations, once per call), so every
// int32 block sum is the plain layout's.
struct GroupQ4_K {
  uint16_t d[kRows];
  uint16_t dmin[kRows];
  uint32_t sc[3][kRows];
  uint8_t qs[kRows][128];
};
static_assert(sizeof(GroupQ4_K) == kRows * sizeof(quant::BlockQ4_K));

// Q5_K: Q4_K's group block (its nibbles are Q4_K's, reordered the same way), then each row's 32
// bytes of fifth bits reordered with them: bit 2c of qh[r][j] is the fifth bit of reordered value
// j of chunk c, bit 2c + 1 that of reordered value 32 + j (the plain block has bit 2c + s of byte
// i for value i of sub-block 2c + s). The kernel ORs them in as Q5_K's plain kernel does.
struct GroupQ5_K {
  GroupQ4_K k4;
  uint8_t qh[kRows][32];
};
static_assert(sizeof(GroupQ5_K) == kRows * sizeof(quant::BlockQ5_K));

// Where value j (0..63) of a reordered chunk comes from: sub-block 0 (a) or 1 (b) of the chunk,
// and its index there (0..31). Values 0..31 are _mm256_unpacklo_epi16(a, b)'s bytes, 32..63
// _mm256_unpackhi_epi16(a, b)'s (both work within 128-bit lanes, 4 int16 from each per lane).
struct K4Source {
  int sub, index;
};
constexpr K4Source k4_source(int j) {
  const int high = j / 32, lane = (j % 32) / 16, r = j % 16;
  const int i16 = lane * 8 + high * 4 + r / 4;  // the int16 taken from a or b
  return {(r % 4) / 2, 2 * i16 + r % 2};
}

// k4_source for j = 0..63, computed once (repacking reads it for every code of a model).
const std::array<K4Source, 64>& k4_sources() {
  static const std::array<K4Source, 64> table = [] {
    std::array<K4Source, 64> t{};
    for (int j = 0; j < 64; ++j) t[j] = k4_source(j);
    return t;
  }();
  return table;
}

inline int k4_plain_code(const uint8_t* qs, int c, K4Source s) {
  const uint8_t byte = qs[32 * c + s.index];
  return s.sub == 0 ? byte & 0xF : byte >> 4;
}

template <class WB>  // Q4_K or Q5_K (the same d, dmin, scales and nibbles)
void pack_group_k(const WB* const* rows, GroupQ4_K& g) {
  for (int r = 0; r < kRows; ++r) {
    g.d[r] = rows[r]->d;
    g.dmin[r] = rows[r]->dmin;
    for (int i = 0; i < 3; ++i) std::memcpy(&g.sc[i][r], rows[r]->scales + 4 * i, 4);
    // Byte j of chunk c: reordered value j in the low nibble, value 32 + j in the high.
    const std::array<K4Source, 64>& src = k4_sources();
    for (int c = 0; c < 4; ++c)
      for (int j = 0; j < 32; ++j)
        g.qs[r][32 * c + j] =
            static_cast<uint8_t>(k4_plain_code(rows[r]->qs, c, src[j]) |
                                 (k4_plain_code(rows[r]->qs, c, src[32 + j]) << 4));
  }
}

#if PARALLM_X86
// unpack_row_k's codes in AVX2 (prefill and the f32 baseline unpack every row of a repacked
// weight on every call): per chunk, the low and high nibbles are unpacklo / unpackhi_epi16(a, b);
// a byte shuffle puts each 128-bit lane's a int16 first and b's after, and unpack{lo,hi}_epi64
// of the two gives a and b back.
PARALLM_AVX2 void unpack_codes_k_avx2(const uint8_t* qs, uint8_t* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0,
                                         1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  for (int c = 0; c < 4; ++c) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    const __m256i lo = _mm256_shuffle_epi8(_mm256_and_si256(raw, low4), split);
    const __m256i hi =
        _mm256_shuffle_epi8(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), split);
    const __m256i a = _mm256_unpacklo_epi64(lo, hi), b = _mm256_unpackhi_epi64(lo, hi);
    // b's codes are 0..15: a 16-bit shift by 4 keeps each in its own byte.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * c),
                        _mm256_or_si256(a, _mm256_slli_epi16(b, 4)));
  }
}
#endif

// Q5_K's fifth bits into the group's reordered qh (see GroupQ5_K), and back. The reorder is the
// same in every chunk, so one shift and mask moves a position's bits of all 4 chunks at once:
// reordered position (h, j) of chunk c is bit 2c + h of qh[j], its plain source bit 2c + sub of
// qh[index] (bits 0, 2, 4, 6 after the shift: mask 0x55).
void pack_group_qh(const quant::BlockQ5_K* const* rows, GroupQ5_K& g) {
  const std::array<K4Source, 64>& src = k4_sources();
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < 32; ++j) {
      int bits = 0;
      for (int h = 0; h < 2; ++h) {
        const K4Source s = src[32 * h + j];
        bits |= ((rows[r]->qh[s.index] >> s.sub) & 0x55) << h;
      }
      g.qh[r][j] = static_cast<uint8_t>(bits);
    }
}
void unpack_row_qh(const GroupQ5_K& g, int r, quant::BlockQ5_K& out) {
  const std::array<K4Source, 64>& src = k4_sources();
  std::memset(out.qh, 0, sizeof out.qh);
  for (int j = 0; j < 32; ++j)
    for (int h = 0; h < 2; ++h) {
      const K4Source s = src[32 * h + j];
      out.qh[s.index] |= static_cast<uint8_t>(((g.qh[r][j] >> h) & 0x55) << s.sub);
    }
}

// Row r of a group block in the plain layout; simd: the codes by unpack_codes_k_avx2 (the scalar
// path, and CPUs without AVX2, take the loop below: its results are the same bytes).
template <class WB>
void unpack_row_k(const GroupQ4_K& g, int r, WB& out, bool simd) {
  out.d = g.d[r];
  out.dmin = g.dmin[r];
  for (int i = 0; i < 3; ++i) std::memcpy(out.scales + 4 * i, &g.sc[i][r], 4);
#if PARALLM_X86
  if (simd) return unpack_codes_k_avx2(g.qs[r], out.qs);
#else
  (void)simd;
#endif
  std::memset(out.qs, 0, sizeof out.qs);
  const std::array<K4Source, 64>& src = k4_sources();
  for (int c = 0; c < 4; ++c)
    for (int j = 0; j < 64; ++j) {
      const K4Source s = src[j];
      const uint8_t byte = g.qs[r][32 * c + j % 32];
      const int code = j < 32 ? byte & 0xF : byte >> 4;
      out.qs[32 * c + s.index] |= static_cast<uint8_t>(code << (4 * s.sub));
    }
}

inline int q4_code(const BlockQ4_0& b, int j) {
  return j < 16 ? (b.qs[j] & 0xF) : (b.qs[j - 16] >> 4);
}
inline int q4_code(const GroupQ4_0& g, int r, int j) {
  return (g.qs[r / 2][j] >> (4 * (r & 1))) & 0xF;
}

template <class WB>
void pack_group(const WB* const* rows, GroupOf<WB>& g) {
  for (int r = 0; r < kRows; ++r) g.d[r] = rows[r]->d;
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    for (int r = 0; r < kRows; ++r) std::memcpy(g.qs[r], rows[r]->qs, 32);
  } else {
    for (int p = 0; p < kRows / 2; ++p)
      for (int j = 0; j < 32; ++j)
        g.qs[p][j] = static_cast<uint8_t>(q4_code(*rows[2 * p], j) |
                                          (q4_code(*rows[2 * p + 1], j) << 4));
  }
}

template <class WB>
void unpack_row(const GroupOf<WB>& g, int r, WB& out) {
  out.d = g.d[r];
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    std::memcpy(out.qs, g.qs[r], 32);
  } else {
    for (int j = 0; j < 16; ++j)
      out.qs[j] = static_cast<uint8_t>(q4_code(g, r, j) | (q4_code(g, r, j + 16) << 4));
  }
}

template <class WB>
inline int group_isum(const GroupOf<WB>& g, int r, const BlockQ8_0& x) {
  int s = 0;
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    for (int j = 0; j < 32; ++j) s += static_cast<int>(g.qs[r][j]) * x.qs[j];
  } else {
    for (int j = 0; j < 32; ++j) s += (q4_code(g, r, j) - 8) * static_cast<int>(x.qs[j]);
  }
  return s;
}

// tile_scalar's operations, in its order, on a group.
template <class WB>
void ptile_scalar(const GroupOf<WB>* g, const Act& x, int64_t nb, float* out) {
  for (int r = 0; r < kRows; ++r) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b)
      acc += f16_to_f32(g[b].d[r]) * f16_to_f32(x.q[b].d) *
             static_cast<float>(group_isum<WB>(g[b], r, x.q[b]));
    out[r] = acc;
  }
}

// Which repacked weights exist: start of the packed bytes -> end, shape and dtype. An entry lives
// as long as its storage (the deleter of repack_quant_weight's buffer removes it), so a pointer is
// never stale.
struct PackedEntry {
  const char* end;
  int64_t N, K;
  DType type;
};
// Never destroyed: a repacked tensor held in static storage may die after this file's statics.
std::shared_mutex& packed_mu() {
  static auto* mu = new std::shared_mutex;
  return *mu;
}
std::map<const char*, PackedEntry>& packed_map() {
  static auto* m = new std::map<const char*, PackedEntry>;
  return *m;
}

// True when w is a repacked weight; a view into one that is not the whole of it (another start,
// shape or dtype) is an error: its rows would be read in the wrong layout.
bool lookup_packed(const Tensor& w) {
  const char* p = static_cast<const char*>(w.raw());
  std::shared_lock lock(packed_mu());
  const auto& m = packed_map();
  if (m.empty()) return false;
  auto it = m.upper_bound(p);
  if (it == m.begin()) return false;
  --it;
  if (p >= it->second.end) return false;
  if (it->first == p && it->second.N == w.dim(0) && it->second.K == w.dim(1) &&
      it->second.type == w.dtype())
    return true;
  fail("quant_matmul", "weight ", w.describe(),
       " is a view into a repacked weight (kernels::repack_quant_weight); only the whole "
       "repacked tensor can be multiplied");
}

// Rows [r0, r0 + n) of w in the plain layout: w's own bytes, or unpacked into tmp.
const char* plain_rows(const Tensor& w, bool packed, int64_t r0, int64_t n, std::vector<char>& tmp,
                       bool simd) {
  const int64_t K = w.dim(1);
  const size_t row_bytes = dtype_bytes(w.dtype(), K);
  const char* base = static_cast<const char*>(w.raw());
  if (!packed) return base + r0 * row_bytes;
  tmp.resize(static_cast<size_t>(n) * row_bytes);
  const int64_t nb = K / dtype_block(w.dtype());
  const int64_t packed_rows = w.dim(0) / kRows * kRows;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = r0 + i;
    char* dst = tmp.data() + i * row_bytes;
    if (row >= packed_rows) {
      std::memcpy(dst, base + row * row_bytes, row_bytes);
      continue;
    }
    const int64_t gi = row / kRows;
    const int r = static_cast<int>(row % kRows);
    if (w.dtype() == DType::Q4_K) {
      const GroupQ4_K* g = reinterpret_cast<const GroupQ4_K*>(base) + gi * nb;
      auto* o = reinterpret_cast<quant::BlockQ4_K*>(dst);
      for (int64_t b = 0; b < nb; ++b) unpack_row_k(g[b], r, o[b], simd);
    } else if (w.dtype() == DType::Q5_K) {
      const GroupQ5_K* g = reinterpret_cast<const GroupQ5_K*>(base) + gi * nb;
      auto* o = reinterpret_cast<quant::BlockQ5_K*>(dst);
      for (int64_t b = 0; b < nb; ++b) {
        unpack_row_k(g[b].k4, r, o[b], simd);
        unpack_row_qh(g[b], r, o[b]);
      }
    } else if (w.dtype() == DType::Q6_K) {
      const GroupQ6_K* g = reinterpret_cast<const GroupQ6_K*>(base) + gi * nb;
      auto* o = reinterpret_cast<quant::BlockQ6_K*>(dst);
      for (int64_t b = 0; b < nb; ++b) o[b] = g[b].blk[r];
    } else if (w.dtype() == DType::Q8_0) {
      const GroupQ8_0* g = reinterpret_cast<const GroupQ8_0*>(base) + gi * nb;
      BlockQ8_0* o = reinterpret_cast<BlockQ8_0*>(dst);
      for (int64_t b = 0; b < nb; ++b) unpack_row<BlockQ8_0>(g[b], r, o[b]);
    } else {
      const GroupQ4_0* g = reinterpret_cast<const GroupQ4_0*>(base) + gi * nb;
      BlockQ4_0* o = reinterpret_cast<BlockQ4_0*>(dst);
      for (int64_t b = 0; b < nb; ++b) unpack_row<BlockQ4_0>(g[b], r, o[b]);
    }
  }
  return tmp.data();
}

#if PARALLM_X86
// The group's 4 weight scales as f32, twice: [d0 d1 d2 d3 d0 d1 d2 d3] (vcvtph2ps, exact as
// _cvtsh_ss); times d_x each lane is the f32 product tile_avx2 forms with _cvtsh_ss(d_w) * d_x.
PARALLM_AVX2 static inline __m256 group_scales(const uint16_t* d) {
  int64_t raw;
  std::memcpy(&raw, d, 8);
  return _mm256_cvtph_ps(_mm_set1_epi64x(raw));
}

// The 4 rows' int32 lanes against one token (block_dot_avx2's for each row).
template <class WB>
PARALLM_AVX2 static inline void group_dots(const GroupOf<WB>& g, __m256i xv, __m256i sv,
                                           __m256i* s) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    (void)sv;
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.qs[r]));
      s[r] = _mm256_madd_epi16(
          _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
    }
  } else {
    const __m256i m = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 2
    for (int p = 0; p < kRows / 2; ++p) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.qs[p]));
      const __m256i q0 = _mm256_and_si256(raw, m);
      const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m);
      s[2 * p] = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q0, xv), ones), sv);
      s[2 * p + 1] = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q1, xv), ones), sv);
    }
  }
}

// acc[r] += broadcast(lane r of sc) * s[r], as tile_avx2's fmadd.
PARALLM_AVX2 static inline void group_fma(__m256 sc, const __m256i* s, __m256* acc) {
  acc[0] = _mm256_fmadd_ps(_mm256_permute_ps(sc, 0x00), _mm256_cvtepi32_ps(s[0]), acc[0]);
  acc[1] = _mm256_fmadd_ps(_mm256_permute_ps(sc, 0x55), _mm256_cvtepi32_ps(s[1]), acc[1]);
  acc[2] = _mm256_fmadd_ps(_mm256_permute_ps(sc, 0xAA), _mm256_cvtepi32_ps(s[2]), acc[2]);
  acc[3] = _mm256_fmadd_ps(_mm256_permute_ps(sc, 0xFF), _mm256_cvtepi32_ps(s[3]), acc[3]);
}
static_assert(kRows == 4, "group_fma broadcasts 4 lanes");

// NT tokens (1 or 2) against one group of 4 rows: one stream of group blocks, one scale load and
// conversion per block for all 4 rows.
template <class WB, int NT>
PARALLM_AVX2 void ptile_avx2(const GroupOf<WB>* g, const Act* x, int64_t nb, float (*out)[kRows]) {
  __m256 acc[NT][kRows];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < kRows; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    // One stream, a fixed distance ahead: every cache line of it (a Q8_0 group block spans
    // two or three lines of 64 bytes, a Q4_0 one one or two).
    const char* ahead = reinterpret_cast<const char*>(g + b) + kPrefetchBytes;
    _mm_prefetch(ahead, _MM_HINT_T0);
    if constexpr (sizeof(GroupOf<WB>) > 64) _mm_prefetch(ahead + 64, _MM_HINT_T0);
    if constexpr (sizeof(GroupOf<WB>) > 128) _mm_prefetch(ahead + 128, _MM_HINT_T0);
    const __m256 dw = group_scales(g[b].d);
#pragma GCC unroll 2
    for (int t = 0; t < NT; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t].q[b].qs));
      const __m256i sv = _mm256_setr_epi32(x[t].sum8[b], 0, 0, 0, 0, 0, 0, 0);
      __m256i s[kRows];
      group_dots<WB>(g[b], xv, sv, s);
      group_fma(_mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b])), s, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < kRows; ++r) out[t][r] = simd::hsum8(acc[t][r]);
}

// The activations' codes in the reordered chunks' order (GroupQ4_K): per 256-value block, chunk
// c's 64 codes (sub-blocks 2c, 2c + 1) as unpacklo_epi16 then unpackhi_epi16 of the two.
PARALLM_AVX2 void k4_reorder_activations(const quant::BlockQ8_K* x, int64_t n, int8_t* out) {
  for (int64_t b = 0; b < n; ++b)
    for (int c = 0; c < 4; ++c) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + 64 * c));
      const __m256i v =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + 64 * c + 32));
      int8_t* o = out + 256 * b + 64 * c;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_unpacklo_epi16(a, v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32), _mm256_unpackhi_epi16(a, v));
    }
}

// One reordered chunk C against NT tokens: the low nibbles meet activation values 0..31, the
// high nibbles 32..63; sc16 holds the row's 8 scales as int16 in both 128-bit halves, and dword C
// of it, (sc_2C, sc_2C+1), scales the alternating int16 lanes of both products.
// kQ5: qh holds the row's reordered fifth bits (GroupQ5_K), ORed in as bit 4.
template <int C, int NT, bool kQ5>
PARALLM_AVX2 static inline void k4_chunk(__m256i sc16, const uint8_t* qs, __m256i qh,
                                         const int8_t* const* xr, __m256i* acc) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * C));
  __m256i lo = _mm256_and_si256(raw, low4);
  __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
  if constexpr (kQ5) {
    lo = _mm256_or_si256(lo, bit_to_4<2 * C>(qh));
    hi = _mm256_or_si256(hi, bit_to_4<2 * C + 1>(qh));
  }
  const __m256i sc = _mm256_shuffle_epi32(sc16, 0x55 * C);
  for (int t = 0; t < NT; ++t) {
    const int8_t* xq = xr[t] + 64 * C;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
    const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), sc);
    const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), sc);
    acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(p0, p1));
  }
}

template <int NT, bool kQ5>
PARALLM_AVX2 static inline void k4_code_lanes(__m256i sc16, const uint8_t* qs, const uint8_t* qh,
                                              const int8_t* const* xr, __m256i* q) {
  for (int t = 0; t < NT; ++t) q[t] = _mm256_setzero_si256();
  __m256i h = _mm256_setzero_si256();
  if constexpr (kQ5) h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
  k4_chunk<0, NT, kQ5>(sc16, qs, h, xr, q);
  k4_chunk<1, NT, kQ5>(sc16, qs, h, xr, q);
  k4_chunk<2, NT, kQ5>(sc16, qs, h, xr, q);
  k4_chunk<3, NT, kQ5>(sc16, qs, h, xr, q);
}

// Q4_K groups (Group = GroupQ4_K), or Q5_K's (GroupQ5_K), against NT tokens (1 or 2):
// ktile4_avx2's reductions and f32 operations on the same int32 block sums (so bit-identical to
// it and to the plain reference), with the 4 rows' scales unpacked together, one d/dmin
// conversion, one stream of group blocks prefetched a fixed distance ahead, and reordered codes
// against reordered activations xr (256 per block).
template <int NT, class Group>
PARALLM_AVX2 void ptile_k_avx2(const Group* g, const quant::BlockQ8_K* const* x,
                               const int8_t* const* xr, int64_t nb, float (*out)[kRows]) {
  constexpr bool kQ5 = std::is_same_v<Group, GroupQ5_K>;
  const __m128i m3f = _mm_set1_epi8(0x3F), m0f = _mm_set1_epi8(0x0F), m30 = _mm_set1_epi8(0x30);
  __m128 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const char* ahead = reinterpret_cast<const char*>(g + b) + kPrefetchBytes;
#pragma GCC unroll 11
    for (int l = 0; l < static_cast<int>(sizeof(Group)) / 64; ++l)
      _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
    const GroupQ4_K* gk;
    const uint8_t(*qh)[32] = nullptr;  // Q5_K: the 4 rows' fifth bits
    if constexpr (kQ5) {
      gk = &g[b].k4;
      qh = g[b].qh;
    } else {
      gk = &g[b];
    }
    const GroupQ4_K& G = *gk;
    // ksum_lanes_avx2's masks, on word i of 4 rows at once.
    const __m128i p0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(G.sc[0]));
    const __m128i p1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(G.sc[1]));
    const __m128i p2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(G.sc[2]));
    const __m128i sc_lo = _mm_and_si128(p0, m3f), m_lo = _mm_and_si128(p1, m3f);
    const __m128i sc_hi = _mm_or_si128(_mm_and_si128(p2, m0f),
                                       _mm_and_si128(_mm_srli_epi32(p0, 2), m30));
    const __m128i m_hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi32(p2, 4), m0f),
                                      _mm_and_si128(_mm_srli_epi32(p1, 2), m30));
    // Rows 2i and 2i + 1's 8 scales (sc01: row 0's then row 1's) and 8 mins (m01), as bytes.
    const __m128i sc01 = _mm_unpacklo_epi32(sc_lo, sc_hi), sc23 = _mm_unpackhi_epi32(sc_lo, sc_hi);
    const __m128i m01 = _mm_unpacklo_epi32(m_lo, m_hi), m23 = _mm_unpackhi_epi32(m_lo, m_hi);
    // Row r's 8 scales as i16 (k4_code_lanes takes them in both 128-bit halves).
    const __m128i zero = _mm_setzero_si128();
    const __m128i sc16[kRows] = {_mm_unpacklo_epi8(sc01, zero), _mm_unpackhi_epi8(sc01, zero),
                                 _mm_unpacklo_epi8(sc23, zero), _mm_unpackhi_epi8(sc23, zero)};
    const quant::BlockQ8_K* xb[NT];
    const int8_t* xrb[NT];
    for (int t = 0; t < NT; ++t) xb[t] = x[t] + b, xrb[t] = xr[t] + 256 * b;
    // Code sums: rows 0 and 1 folded by one hadd before rows 2 and 3 are formed (fewer live
    // registers), then hsum4_i32's tree: the same int32 sums.
    __m256i h[NT][2];
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
      __m256i q0[NT], q1[NT];
      k4_code_lanes<NT, kQ5>(_mm256_broadcastsi128_si256(sc16[2 * i]), G.qs[2 * i],
                             kQ5 ? qh[2 * i] : nullptr, xrb, q0);
      k4_code_lanes<NT, kQ5>(_mm256_broadcastsi128_si256(sc16[2 * i + 1]), G.qs[2 * i + 1],
                             kQ5 ? qh[2 * i + 1] : nullptr, xrb, q1);
      for (int t = 0; t < NT; ++t) h[t][i] = _mm256_hadd_epi32(q0[t], q1[t]);
    }
    // Mins, 4 rows at once: each row's 8 mins (i16) against the token's 8 sub-block sums
    // (bsums pairs, |.| <= 32 x 127, i16) by madd, two rows per register, then a hadd tree to
    // [M0 M1 M2 M3]: q4k_min_sum's int32 sum for each row.
    const __m256i m16_01 = _mm256_cvtepu8_epi16(m01), m16_23 = _mm256_cvtepu8_epi16(m23);
    const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(G.d)));
    const __m128 d = _mm256_castps256_ps128(dd), dmin = _mm256_extractf128_ps(dd, 1);
    for (int t = 0; t < NT; ++t) {
      const __m128i bs = _mm_hadd_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb[t]->bsums)),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb[t]->bsums + 8)));
      const __m256i bs2 = _mm256_broadcastsi128_si256(bs);
      // [row 0's 4 partial sums | row 1's], [row 2's | row 3's]
      const __m256i a01 = _mm256_madd_epi16(m16_01, bs2), a23 = _mm256_madd_epi16(m16_23, bs2);
      const __m256i h01_23 = _mm256_hadd_epi32(a01, a23);
      const __m256i hm = _mm256_hadd_epi32(h01_23, h01_23);
      // hm: [M0 M2 M0 M2 | M1 M3 M1 M3]
      const __m128i M = _mm_unpacklo_epi32(_mm256_castsi256_si128(hm),
                                           _mm256_extracti128_si256(hm, 1));
      const __m256i hq = _mm256_hadd_epi32(h[t][0], h[t][1]);
      const __m128i Q = _mm_add_epi32(_mm256_castsi256_si128(hq), _mm256_extracti128_si256(hq, 1));
      const __m128 dx = _mm_set1_ps(xb[t]->d);
      acc[t] = _mm_fmadd_ps(_mm_mul_ps(d, dx), _mm_cvtepi32_ps(Q), acc[t]);
      acc[t] = _mm_fnmadd_ps(_mm_mul_ps(dmin, dx), _mm_cvtepi32_ps(M), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) _mm_storeu_ps(out[t], acc[t]);
}
#endif  // PARALLM_X86

// The activations of one call, quantized once by the calling thread into its thread-local
// buffers and read by all the pool's threads (through these plain pointers: inside a pool lambda
// the thread_local names would be each worker's own, empty, buffers): the Q8_0 blocks, their
// scales as f32 and 8 x the sum of each block's codes. `offset_codes`: each code stored as
// x + 128 (as an unsigned byte, in the int8_t field), for kernels that need x unsigned; the sums
// are the signed codes'.
struct QuantizedActs {
  const BlockQ8_0* q;
  const float* d;
  const int32_t* sum8;
};
QuantizedActs quantize_acts(const float* x, int64_t T, int64_t K, bool offset_codes) {
  thread_local std::vector<BlockQ8_0> xq_buf;
  thread_local std::vector<float> xd_buf;
  thread_local std::vector<int32_t> xs_buf;
  const size_t n = static_cast<size_t>(T * (K / 32));
  xq_buf.resize(n);
  xd_buf.resize(n);
  xs_buf.resize(n);
  quantize_activations(x, T, K, xq_buf.data());
  for (size_t b = 0; b < n; ++b) {
    BlockQ8_0& q = xq_buf[b];
    xd_buf[b] = f16_to_f32(q.d);
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += q.qs[j];
    xs_buf[b] = 8 * s;
    if (offset_codes)
      for (int j = 0; j < 32; ++j)
        q.qs[j] = static_cast<int8_t>(static_cast<uint8_t>(q.qs[j]) ^ 0x80);
  }
  return {xq_buf.data(), xd_buf.data(), xs_buf.data()};
}

template <class WB>
void run_blocks(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                QuantPath path, bool packed) {
  const int64_t N = w.dim(0), K = w.dim(1), nb = K / 32;
  const QuantizedActs acts = quantize_acts(x, T, K, false);
  const BlockQ8_0* xq = acts.q;
  const float* xd = acts.d;
  const int32_t* xs = acts.sum8;
  const WB* wb = static_cast<const WB*>(w.raw());
  const TileFn<WB> tile = tile_for<WB>(path);
  const int64_t tiles = (N + kRows - 1) / kRows;
  ThreadPool::current().parallel_for(tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t n0 = ti * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      const WB* rowp[kRows];
      for (int r = 0; r < rows; ++r) rowp[r] = wb + (n0 + r) * nb;
      if (packed && rows == kRows) {  // a group of the repacked layout (tail rows stay plain)
        const GroupOf<WB>* g = reinterpret_cast<const GroupOf<WB>*>(wb) + ti * nb;
        auto store = [&](int64_t t, const float* out) {
          float* yt = y + t * N + n0;
          for (int r = 0; r < kRows; ++r) yt[r] = accumulate ? yt[r] + out[r] : out[r];
        };
        int64_t t = 0;
#if PARALLM_X86
        if (path != QuantPath::Scalar) {
          for (; t + 2 <= T; t += 2) {
            float out[2][kRows];
            const Act act[2] = {{xq + t * nb, xd + t * nb, xs + t * nb},
                                {xq + (t + 1) * nb, xd + (t + 1) * nb, xs + (t + 1) * nb}};
            ptile_avx2<WB, 2>(g, act, nb, out);
            store(t, out[0]);
            store(t + 1, out[1]);
          }
          for (; t < T; ++t) {
            float out[1][kRows];
            const Act act[1] = {{xq + t * nb, xd + t * nb, xs + t * nb}};
            ptile_avx2<WB, 1>(g, act, nb, out);
            store(t, out[0]);
          }
        }
#endif
        for (; t < T; ++t) {
          float out[kRows];
          ptile_scalar<WB>(g, Act{xq + t * nb, xd + t * nb, xs + t * nb}, nb, out);
          store(t, out);
        }
        continue;
      }
      int64_t t = 0;
#if PARALLM_X86
      if (path == QuantPath::Avx2 && rows == kRows)
        for (; t + 2 <= T; t += 2) {
          float out[2][kRows];
          const Act act[2] = {{xq + t * nb, xd + t * nb, xs + t * nb},
                              {xq + (t + 1) * nb, xd + (t + 1) * nb, xs + (t + 1) * nb}};
          tile2_avx2(rowp, act, nb, out);
          for (int i = 0; i < 2; ++i) {
            float* yt = y + (t + i) * N + n0;
            for (int r = 0; r < rows; ++r) yt[r] = accumulate ? yt[r] + out[i][r] : out[i][r];
          }
        }
#endif
      for (; t < T; ++t) {
        float out[kRows];
        const Act act{xq + t * nb, xd + t * nb, xs + t * nb};
        tile(rowp, rows, act, nb, out);
        float* yt = y + t * N + n0;
        for (int r = 0; r < rows; ++r) yt[r] = accumulate ? yt[r] + out[r] : out[r];
      }
    }
  });
}

// Q4_K / Q5_K / Q6_K below 64 tokens: the activations to BlockQ8_K once per call, then tiles of 4
// rows against each token, as run_blocks.
template <class WB>
void run_kblocks(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                 QuantPath path, bool packed) {
  const int64_t N = w.dim(0), K = w.dim(1), nb = K / 256;
  thread_local std::vector<quant::BlockQ8_K> xq_buf;
  xq_buf.resize(static_cast<size_t>(T * nb));
  quantize_activations_k(x, T, K, xq_buf.data());
  const quant::BlockQ8_K* xq = xq_buf.data();  // not the workers' own thread_local buffers
  // The repacked Q4_K / Q5_K kernel's activation codes, reordered as its codes are (GroupQ4_K).
  thread_local std::vector<int8_t> xr_buf;
  const int8_t* xr = nullptr;
#if PARALLM_X86
  if (kHasMins<WB> && packed && path != QuantPath::Scalar) {
    xr_buf.resize(static_cast<size_t>(T * nb * 256));
    k4_reorder_activations(xq, T * nb, xr_buf.data());
    xr = xr_buf.data();
  }
#endif
  const WB* wb = static_cast<const WB*>(w.raw());
  const KTileFn<WB> tile = ktile_for<WB>(path);
  const int64_t tiles = (N + kRows - 1) / kRows;
  ThreadPool::current().parallel_for(tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t n0 = ti * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      const WB* rowp[kRows];
      for (int r = 0; r < rows; ++r) rowp[r] = wb + (n0 + r) * nb;
      if (packed && rows == kRows) {  // a group of the repacked layout (tail rows stay plain)
        auto store = [&](int64_t t, const float* out) {
          float* yt = y + t * N + n0;
          for (int r = 0; r < kRows; ++r) yt[r] = accumulate ? yt[r] + out[r] : out[r];
        };
        int64_t t = 0;
#if PARALLM_X86
        // Tiles of 2 tokens, then 1: tile(NT, t, out) for tokens t..t + NT - 1.
        auto by_tokens = [&](auto tile) {
          for (; t + 2 <= T; t += 2) {
            float out[2][kRows];
            tile(std::integral_constant<int, 2>{}, t, out);
            store(t, out[0]);
            store(t + 1, out[1]);
          }
          for (; t < T; ++t) {
            float out[1][kRows];
            tile(std::integral_constant<int, 1>{}, t, out);
            store(t, out[0]);
          }
        };
        if (path != QuantPath::Scalar) {
          if constexpr (std::is_same_v<WB, quant::BlockQ6_K>) {
            const GroupQ6_K* g = reinterpret_cast<const GroupQ6_K*>(wb) + ti * nb;
            by_tokens([&](auto nt, int64_t t0, float(*out)[kRows]) {
              constexpr int NT = decltype(nt)::value;
              const quant::BlockQ8_K* xt[NT];
              for (int i = 0; i < NT; ++i) xt[i] = xq + (t0 + i) * nb;
              ktile4_avx2<WB, NT>(g, xt, nb, out);
            });
          }
          if constexpr (kHasMins<WB>) {
            using G =
                std::conditional_t<std::is_same_v<WB, quant::BlockQ4_K>, GroupQ4_K, GroupQ5_K>;
            const G* g = reinterpret_cast<const G*>(wb) + ti * nb;
            by_tokens([&](auto nt, int64_t t0, float(*out)[kRows]) {
              constexpr int NT = decltype(nt)::value;
              const quant::BlockQ8_K* xt[NT];
              const int8_t* xrt[NT];
              for (int i = 0; i < NT; ++i) {
                xt[i] = xq + (t0 + i) * nb;
                xrt[i] = xr + (t0 + i) * nb * 256;
              }
              ptile_k_avx2<NT>(g, xt, xrt, nb, out);
            });
          }
        }
#endif
        if (t < T) {  // the plain reference on the group's rows unpacked
          thread_local std::vector<char> tmp;
          const auto* plain =
              reinterpret_cast<const WB*>(plain_rows(w, true, n0, kRows, tmp, false));
          const WB* prow[kRows];
          for (int r = 0; r < kRows; ++r) prow[r] = plain + r * nb;
          for (; t < T; ++t) {
            float out[kRows];
            ktile_scalar(prow, kRows, xq + t * nb, nb, out);
            store(t, out);
          }
        }
        continue;
      }
      int64_t t = 0;
#if PARALLM_X86
      if (path != QuantPath::Scalar && rows == kRows)
        for (; t + 2 <= T; t += 2) {
          float out[2][kRows];
          const quant::BlockQ8_K* xt[2] = {xq + t * nb, xq + (t + 1) * nb};
          ktile4_avx2<WB, 2>(rowp, xt, nb, out);
          for (int i = 0; i < 2; ++i) {
            float* yt = y + (t + i) * N + n0;
            for (int r = 0; r < rows; ++r) yt[r] = accumulate ? yt[r] + out[i][r] : out[i][r];
          }
        }
#endif
      for (; t < T; ++t) {
        float out[kRows];
        tile(rowp, rows, xq + t * nb, nb, out);
        float* yt = y + t * N + n0;
        for (int r = 0; r < rows; ++r) yt[r] = accumulate ? yt[r] + out[r] : out[r];
      }
    }
  });
}

// Whether plain_rows may unpack repacked Q4_K codes with unpack_codes_k_avx2.
bool simd_unpack() {
#if PARALLM_X86
  return simd_level() >= SimdLevel::Avx2;
#else
  return false;
#endif
}

// The f32 baseline (quant_matmul_dequant): each row dequantized once, then a plain dot product
// per token.
void run_dequant(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                 bool packed) {
  const int64_t N = w.dim(0), K = w.dim(1);
  const bool simd = simd_unpack();
  ThreadPool::current().parallel_for(N, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(static_cast<size_t>(K));
    std::vector<char> tmp;
    for (int64_t n = n0; n < n1; ++n) {
      quant::dequantize(w.dtype(), plain_rows(w, packed, n, 1, tmp, simd), row.data(), K);
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * K;
        float s[8] = {};
        for (int64_t k = 0; k < K; k += 8)
          for (int j = 0; j < 8; ++j) s[j] += row[k + j] * xt[k + j];
        float v = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        float& o = y[t * N + n];
        o = accumulate ? o + v : v;
      }
    }
  });
}

// Prefill (T >= kSgemmMinT): the weights dequantized to f32 a block of rows at a time into the
// thread's scratch, then OpenBLAS sgemm with the activations in f32, as matmul does for bf16
// (kernels/matmul.cpp): the dequantization is paid once per block of rows, not once per token,
// and sgemm's tiles beat rows of integer GEMVs by far at hundreds of tokens.
constexpr int64_t kSgemmMinT = 64;
constexpr int64_t kDequantBlockBytes = int64_t{8} << 20;

// Q4_0 / Q8_0 on the AVX-512 VNNI path from kInt8GemmMinT tokens (prefill, and batched decoding
// of 16 sequences or more): an int8 GEMM instead of sgemm or the GEMV. The activations are
// quantized to Q8_0 as for decoding; each thread packs 32 rows of W at a time (a panel), plain or
// repacked, into per-block tiles of codes as bytes, [8 quads of 4 columns][32 rows][4], so
// one 64-byte load holds 16 rows' next 4 codes and vpdpbusd multiplies them by one token's 4
// codes broadcast to every lane. A tile of 32 rows x 4 tokens keeps 8 int32 accumulators for the
// current block and 8 f32 ones for the row (21 of the 32 registers), so each weight load feeds 4
// vpdpbusd and each broadcast 2. Q4_0: codes 0..15 (unsigned operand) against x, and the block's
// sum starts at -8 x sum(x). Q8_0: the weights are signed, so the activations are made unsigned
// (x + 128, the operand vpdpbusd wants) and the block's sum starts at -128 x sum(w). Either way
// each block's int32 sum is block_isum's exactly, and it is scaled and added in tile_scalar's
// f32 operations and order ((dw x dx) x sum, added to a sum from 0 block by block, no fma), so
// every output is bit-identical to the plain reference's.
constexpr int kPanelRows = 32;
constexpr int kGemmTokens = 4;
// Tokens from which the int8 GEMM beats the GEMV (batched decoding runs below 64 tokens too).
// Measured on a Zen 5, 2 threads, `bench decode --batch B` on the tinyllama shape, GEMM against
// GEMV: Q8_0 0.69x at B = 8, 1.11x at 16, 1.47x at 24, 1.79x at 32; Q4_0 (panels packed from the
// repacked groups) 0.60x at 8, 1.02x at 16, 1.42x at 24, 1.84x at 32.
constexpr int64_t kInt8GemmMinT = 16;
// Q4_K / Q5_K / Q6_K prefill (from kSgemmMinT tokens) on kernels/matmul.h's bf16 GEMM.
bool kformat_bf16_gemm_runs(DType type) {
  return is_block(type) && dtype_block(type) == 256 && bf16_gemm_available();
}
// Tokens from which the AVX2 int8 GEMM (below) runs for `type`, 0 where it has none. Zen 3, 2
// threads, `bench decode --batch B` on the tinyllama shape, the GEMM against the GEMV, two runs
// each: Q4_0 0.94x / 0.99x at B = 8, 1.02x / 1.21x at 16, 1.60x / 1.17x at 32; Q8_0 (its GEMM does
// twice Q4_0's work per code) 0.63x / 0.76x at 8, 0.83x / 0.58x at 16, 1.18x / 0.85x at 32: from
// 64, where sgemm would run. The K formats, one [5632, 2048] weight, three alternations of
// GEMV and GEMM (Zen 3, 2 threads): Q4_K 0.93-0.97x at T = 16, 1.15-1.2x at 32, 1.2-1.3x at 48;
// Q6_K 1.15-1.2x at 32, 1.3x at 48; Q5_K (its GEMM sums 4 quads in int16, not 8) 0.96-0.98x at
// 32, 1.0-1.2x at 48, 1.3x at 63. `bench decode --batch 32` (Q4_K, Q6_K) / 48 (Q5_K) on the
// tinyllama shape then ran 1.28-1.34x / 1.24-1.30x the GEMV's tokens/s.
int64_t int8_gemm_avx2_min_t(DType type) {
  switch (type) {
    case DType::Q4_0:
      return 16;
    case DType::Q8_0:
      return kSgemmMinT;
    case DType::Q4_K:
    case DType::Q6_K:
      return 32;
    case DType::Q5_K:
      return 48;
    default:
      return 0;
  }
}
enum class Int8Gemm { None, Avx512Vnni, Avx2 };
Int8Gemm int8_gemm_for(DType type, int64_t T, QuantPath path) {
  if (path == QuantPath::Avx512Vnni)  // the K formats there: the bf16 GEMM or sgemm
    return (type == DType::Q8_0 || type == DType::Q4_0) && T >= kInt8GemmMinT ? Int8Gemm::Avx512Vnni
                                                                              : Int8Gemm::None;
  if (path == QuantPath::Avx2 || path == QuantPath::AvxVnni) {
    const int64_t from = int8_gemm_avx2_min_t(type);
    return from > 0 && T >= from ? Int8Gemm::Avx2 : Int8Gemm::None;
  }
  return Int8Gemm::None;
}

struct alignas(64) PanelBlock {
  uint8_t codes[8][kPanelRows][4];
  float d[kPanelRows];
  int32_t start[kPanelRows];  // Q8_0: -128 x the row's code sum; Q4_0: 0 (unused)
};

#if PARALLM_X86
// 8 rows' 8 dwords (v[r], dword q = the row's columns 4q..4q+3) -> out[q] = the 8 rows' dword q.
PARALLM_AVX2 static inline void transpose8x8_epi32(const __m256i (&v)[8], __m256i (&out)[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);      // dwords 0, 1 | 4, 5
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);  // dwords 2, 3 | 6, 7
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3
    const __m256i* th = t + 4 * h;
    u[4 * h + 0] = _mm256_unpacklo_epi64(th[0], th[2]);  // dword 0 | 4
    u[4 * h + 1] = _mm256_unpackhi_epi64(th[0], th[2]);  // dword 1 | 5
    u[4 * h + 2] = _mm256_unpacklo_epi64(th[1], th[3]);  // dword 2 | 6
    u[4 * h + 3] = _mm256_unpackhi_epi64(th[1], th[3]);  // dword 3 | 7
  }
  for (int q = 0; q < 4; ++q) {
    out[q] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x20);
    out[q + 4] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x31);
  }
}

// Rows [n0, n0 + nr) of w (nb blocks per row) into nb PanelBlocks, read where they lie: a plain
// row's blocks, or a repacked group's share of the row (no unpacking to plain blocks first); rows
// nr..31 are zeros (scale 0: they add 0 to outputs that are never stored). 8 rows at a time: each
// row's 32 codes as bytes in one register (Q4_0's nibbles unpacked to 0..15), an 8 x 8 transpose
// of their dwords gives the 8 quads' tiles. Q8_0's start (-128 x the row's code sum, for the
// AVX-512 GEMM) from the same tiles: vpmaddubsw by ones sums code pairs, the quads add in int16
// (|.| <= 8 x 256), vpmaddwd by ones finishes each row. The codes are the ones every GEMV reads,
// so the GEMMs' bit-for-bit test against the scalar GEMV checks the packing too.
template <class WB>
PARALLM_AVX2 void pack_panel(const Tensor& w, bool packed, int64_t n0, int nr, int64_t nb,
                             PanelBlock* out) {
  constexpr bool kQ8 = std::is_same_v<WB, BlockQ8_0>;
  const WB* plain = static_cast<const WB*>(w.raw());
  const auto* groups = reinterpret_cast<const GroupOf<WB>*>(plain);
  const int64_t packed_rows = packed ? w.dim(0) / kRows * kRows : 0;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    PanelBlock& p = out[b];
    for (int r0 = 0; r0 < kPanelRows; r0 += 8) {
      __m256i v[8];
      alignas(16) uint16_t d[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = n0 + r0 + i;
        if (r0 + i >= nr) {
          v[i] = _mm256_setzero_si256();
          d[i] = 0;
          continue;
        }
        const int gr = static_cast<int>(row % kRows);  // the row's place in its group
        const GroupOf<WB>& g = groups[row / kRows * nb + b];
        const WB& blk = plain[row * nb + b];
        const bool grouped = row < packed_rows;
        d[i] = grouped ? g.d[gr] : blk.d;
        if constexpr (kQ8) {
          v[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grouped ? g.qs[gr] : blk.qs));
        } else if (grouped) {  // codes in column order, this row's in one nibble of each byte
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.qs[gr / 2]));
          v[i] = _mm256_and_si256(gr & 1 ? _mm256_srli_epi16(raw, 4) : raw, low4);
        } else {
          v[i] = nibbles_avx2(blk);
        }
      }
      __m256i q[8];
      transpose8x8_epi32(v, q);
      for (int k = 0; k < 8; ++k)
        _mm256_store_si256(reinterpret_cast<__m256i*>(p.codes[k][r0]), q[k]);
      _mm256_store_ps(p.d + r0,
                      _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(d))));
      __m256i start = _mm256_setzero_si256();
      if constexpr (kQ8) {
        const __m256i ones8 = _mm256_set1_epi8(1);
        __m256i s16 = _mm256_maddubs_epi16(ones8, q[0]);
        for (int k = 1; k < 8; ++k) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(ones8, q[k]));
        const __m256i sum = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
        start = _mm256_sub_epi32(start, _mm256_slli_epi32(sum, 7));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(p.start + r0), start);
    }
  }
}

// TT tokens x the panel's 32 rows. x: the tokens' Q8_0 blocks (row t at x + t * nb; Q8_0 weights:
// codes + 128 as unsigned bytes), xd their scales, xs8 8 x their code sums (Q4_0). Outputs for
// rows [0, nr) to y[t * ldy + r].
template <class WB, int TT>
PARALLM_AVX512VNNI void gemm_tile_512(const PanelBlock* p, int64_t nb, const BlockQ8_0* x,
                                      const float* xd, const int32_t* xs8, float* y, int64_t ldy,
                                      int nr, bool accumulate) {
  constexpr bool kQ8 = std::is_same_v<WB, BlockQ8_0>;
  __m512 acc[TT][2];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const PanelBlock& pb = p[b];
    __m512i s[TT][2];
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      if constexpr (kQ8) {
        s[t][0] = _mm512_load_si512(pb.start);
        s[t][1] = _mm512_load_si512(pb.start + 16);
      } else {
        s[t][0] = s[t][1] = _mm512_set1_epi32(-xs8[t * nb + b]);
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      const __m512i w0 = _mm512_load_si512(pb.codes[q][0]);
      const __m512i w1 = _mm512_load_si512(pb.codes[q][16]);
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        int32_t v;
        std::memcpy(&v, x[t * nb + b].qs + 4 * q, 4);
        const __m512i xv = _mm512_set1_epi32(v);
        if constexpr (kQ8) {
          s[t][0] = _mm512_dpbusd_epi32(s[t][0], xv, w0);
          s[t][1] = _mm512_dpbusd_epi32(s[t][1], xv, w1);
        } else {
          s[t][0] = _mm512_dpbusd_epi32(s[t][0], w0, xv);
          s[t][1] = _mm512_dpbusd_epi32(s[t][1], w1, xv);
        }
      }
    }
    const __m512 d0 = _mm512_load_ps(pb.d), d1 = _mm512_load_ps(pb.d + 16);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const __m512 dx = _mm512_set1_ps(xd[t * nb + b]);
      __m512 p0 =
          _mm512_mul_ps(_mm512_mul_ps(d0, dx), _mm512_maskz_cvtepi32_ps(simd::kAll16, s[t][0]));
      __m512 p1 =
          _mm512_mul_ps(_mm512_mul_ps(d1, dx), _mm512_maskz_cvtepi32_ps(simd::kAll16, s[t][1]));
      // The products are rounded before the add, as in tile_scalar: the empty asm keeps the
      // compiler from contracting mul and add into one fma (C++'s default -ffp-contract=fast).
      __asm__("" : "+v"(p0), "+v"(p1));
      acc[t][0] = _mm512_add_ps(acc[t][0], p0);
      acc[t][1] = _mm512_add_ps(acc[t][1], p1);
    }
  }
  simd::store_rows32<TT>(acc, y, ldy, nr, accumulate);
}

// The int8 GEMMs' driver: the pool's threads take the 32-row panels of W in turn, each packing
// them into its own nb Panel blocks (pack(n0, nr, panel)) and running the tiles on them
// (tiles(panel, n0, nr)).
template <class Panel, class Pack, class Tiles>
void for_each_panel(int64_t N, int64_t nb, const Pack& pack, const Tiles& tiles) {
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  ThreadPool::current().parallel_for(panels, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<Panel> panel;
    panel.resize(static_cast<size_t>(nb));
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t n0 = pi * kPanelRows;
      const int nr = static_cast<int>(std::min<int64_t>(kPanelRows, N - n0));
      pack(n0, nr, panel.data());
      tiles(static_cast<const Panel*>(panel.data()), n0, nr);
    }
  });
}

// The Q8_0 / Q4_0 GEMMs: the activations quantized once (codes + 128 when offset_codes), then
// tiles(panel, n0, nr, acts) on each panel.
template <class WB, class Tiles>
void for_each_q_panel(const float* x, int64_t T, const Tensor& w, bool packed, bool offset_codes,
                      const Tiles& tiles) {
  const int64_t nb = w.dim(1) / 32;
  const QuantizedActs acts = quantize_acts(x, T, w.dim(1), offset_codes);
  for_each_panel<PanelBlock>(
      w.dim(0), nb,
      [&](int64_t n0, int nr, PanelBlock* out) { pack_panel<WB>(w, packed, n0, nr, nb, out); },
      [&](const PanelBlock* panel, int64_t n0, int nr) { tiles(panel, n0, nr, acts); });
}

template <class WB>
void run_gemm_512(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                  bool packed) {
  const int64_t N = w.dim(0), nb = w.dim(1) / 32;
  // Q8_0 weights are the signed operand of vpdpbusd: the activations' codes go in as x + 128.
  for_each_q_panel<WB>(x, T, w, packed, std::is_same_v<WB, BlockQ8_0>,
                       [&](const PanelBlock* panel, int64_t n0, int nr, const QuantizedActs& a) {
                         int64_t t = 0;
                         for (; t + kGemmTokens <= T; t += kGemmTokens)
                           gemm_tile_512<WB, kGemmTokens>(panel, nb, a.q + t * nb, a.d + t * nb,
                                                          a.sum8 + t * nb, y + t * N + n0, N, nr,
                                                          accumulate);
                         for (; t < T; ++t)
                           gemm_tile_512<WB, 1>(panel, nb, a.q + t * nb, a.d + t * nb,
                                                a.sum8 + t * nb, y + t * N + n0, N, nr, accumulate);
                       });
}

// Rows [0, nr) (nr <= 16) of TT tokens' 16-row accumulators to y[t * ldy + r] (+= when
// accumulate).
template <int TT>
PARALLM_AVX2 static inline void store_rows16_avx2(const __m256 (&acc)[TT][2], float* y, int64_t ldy,
                                                  int nr, bool accumulate) {
#pragma GCC unroll 4
  for (int t = 0; t < TT; ++t) {
    float* yt = y + t * ldy;
    if (nr >= 16) {
      __m256 v0 = acc[t][0], v1 = acc[t][1];
      if (accumulate) {
        v0 = _mm256_add_ps(_mm256_loadu_ps(yt), v0);
        v1 = _mm256_add_ps(_mm256_loadu_ps(yt + 8), v1);
      }
      _mm256_storeu_ps(yt, v0);
      _mm256_storeu_ps(yt + 8, v1);
    } else {
      alignas(32) float out[16];
      _mm256_store_ps(out, acc[t][0]);
      _mm256_store_ps(out + 8, acc[t][1]);
      for (int r = 0; r < nr; ++r) yt[r] = accumulate ? yt[r] + out[r] : out[r];
    }
  }
}

// The same GEMM on AVX2 (no vpdpbusd), for Q8_0 and Q4_0 on the AVX2 and AVX-VNNI paths: the
// panel is taken 16 rows (two 8-row groups, one 32-byte load each per quad) by 3 tokens (Q4_0) or
// 2 (Q8_0) at a time.
// Q4_0: vpmaddubsw multiplies the unsigned codes by x (int16 pair sums |.| <= 2 x 15 x 127 =
// 3810) and the 8 quads of a block add up in int16 (<= 8 x 3810 = 30480 < 32767, no saturation),
// widened once per block by one vpmaddwd; 8 x sum(x) comes off in int32. Q8_0: the weights are
// signed, so the sign trick of the GEMV (|w| unsigned, x with w's sign; pair sums <= 2 x 128 x
// 127 = 32512) and a vpmaddwd per quad (two pair sums would not fit int16). Either way each
// block's int32 sum is block_isum's, scaled and added in tile_scalar's f32 operations and order:
// bit-identical to the plain reference, as the AVX-512 GEMM.
template <class WB, int TT>
PARALLM_AVX2 void gemm_tile_avx2(const PanelBlock* p, int64_t nb, int half, const BlockQ8_0* x,
                                 const float* xd, const int32_t* xs8, float* y, int64_t ldy, int nr,
                                 bool accumulate) {
  constexpr bool kQ8 = std::is_same_v<WB, BlockQ8_0>;
  const int r0 = 16 * half;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[TT][2];
#pragma GCC unroll 4
  for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const PanelBlock& pb = p[b];
    __m256i s[TT][2];
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) s[t][0] = s[t][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int q = 0; q < 8; ++q) {
      const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.codes[q][r0]));
      const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.codes[q][r0 + 8]));
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) {
        int32_t v;
        std::memcpy(&v, x[t * nb + b].qs + 4 * q, 4);
        const __m256i xv = _mm256_set1_epi32(v);
        if constexpr (kQ8) {
          const __m256i m0 = _mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(xv, w0));
          const __m256i m1 = _mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(xv, w1));
          s[t][0] = _mm256_add_epi32(s[t][0], _mm256_madd_epi16(m0, ones));
          s[t][1] = _mm256_add_epi32(s[t][1], _mm256_madd_epi16(m1, ones));
        } else {
          s[t][0] = _mm256_add_epi16(s[t][0], _mm256_maddubs_epi16(w0, xv));
          s[t][1] = _mm256_add_epi16(s[t][1], _mm256_maddubs_epi16(w1, xv));
        }
      }
    }
    const __m256 d0 = _mm256_load_ps(pb.d + r0), d1 = _mm256_load_ps(pb.d + r0 + 8);
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) {
      __m256i i0 = s[t][0], i1 = s[t][1];
      if constexpr (!kQ8) {
        const __m256i off = _mm256_set1_epi32(xs8[t * nb + b]);
        i0 = _mm256_sub_epi32(_mm256_madd_epi16(i0, ones), off);
        i1 = _mm256_sub_epi32(_mm256_madd_epi16(i1, ones), off);
      }
      const __m256 dx = _mm256_set1_ps(xd[t * nb + b]);
      __m256 p0 = _mm256_mul_ps(_mm256_mul_ps(d0, dx), _mm256_cvtepi32_ps(i0));
      __m256 p1 = _mm256_mul_ps(_mm256_mul_ps(d1, dx), _mm256_cvtepi32_ps(i1));
      __asm__("" : "+x"(p0), "+x"(p1));  // no fma: the products are rounded, as in tile_scalar
      acc[t][0] = _mm256_add_ps(acc[t][0], p0);
      acc[t][1] = _mm256_add_ps(acc[t][1], p1);
    }
  }
  store_rows16_avx2<TT>(acc, y + r0, ldy, nr, accumulate);
}

template <class WB>
void run_gemm_avx2(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                   bool packed) {
  const int64_t N = w.dim(0), nb = w.dim(1) / 32;
  for_each_q_panel<WB>(
      x, T, w, packed, false,
      [&](const PanelBlock* panel, int64_t n0, int nr, const QuantizedActs& a) {
        for (int half = 0; half < 2 && 16 * half < nr; ++half) {
          const int hr = std::min(16, nr - 16 * half);
          auto tile = [&](auto tt, int64_t t) {
            gemm_tile_avx2<WB, decltype(tt)::value>(panel, nb, half, a.q + t * nb, a.d + t * nb,
                                                    a.sum8 + t * nb, y + t * N + n0, N, hr,
                                                    accumulate);
          };
          int64_t t = 0;
          if constexpr (!std::is_same_v<WB, BlockQ8_0>)  // Q8_0's tile of 3 spills (measured)
            for (; t + 3 <= T; t += 3) tile(std::integral_constant<int, 3>{}, t);
          for (; t + 2 <= T; t += 2) tile(std::integral_constant<int, 2>{}, t);
          for (; t < T; ++t) tile(std::integral_constant<int, 1>{}, t);
        }
      });
}

// Q4_K on the AVX2 and AVX-VNNI paths from kSgemmMinT tokens (prefill): the same scheme per
// 256-value super-block, against BlockQ8_K activations (quantized as for decoding). A panel block
// holds 32 rows' codes as bytes in 64 quads (sub-block j = quads 8j..8j+7), each row's sub-block
// scales twice (its two int16 lanes), its mins in pairs (m_2p, m_2p+1) and d, dmin in f32. Per
// sub-block, vpmaddubsw sums codes (0..15) x x in int16 over its 8 quads (<= 8 x 2 x 15 x 127 =
// 30480), one vpmaddwd by the row's scale adds it to the int32 q sum; the min sum is 4 vpmaddwd of
// the min pairs against the token's sub-block sums (<= 32 x 127 = 4064, an int16). Both sums are
// ksum_scalar's, combined with kcombine's fmas in its order: bit-identical to the scalar GEMV.
struct alignas(64) PanelKBlock {
  uint8_t codes[64][kPanelRows][4];
  int16_t sc[8][kPanelRows][2];
  int16_t m[4][kPanelRows][2];
  float d[kPanelRows];
  float dmin[kPanelRows];
};

// 8 rows' codes for 32 values (v[i]: row r0 + i's values 32c..32c+31 as bytes) -> the panel's
// quads 8c..8c+7 of those rows.
PARALLM_AVX2 static inline void store_chunk8(const __m256i (&v)[8], uint8_t (*codes)[kPanelRows][4],
                                             int c, int r0) {
  __m256i q[8];
  transpose8x8_epi32(v, q);
  for (int k = 0; k < 8; ++k)
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes[8 * c + k][r0]), q[k]);
}

// Q5_K the same way, its codes 0..31 in the panel: vpmaddubsw sums over 4 quads in int16 (<= 4 x 2
// x 31 x 127 = 31496; 8 would overflow), so two vpmaddwd by the scale per sub-block.
struct alignas(64) PanelK5Block : PanelKBlock {};

// Rows [n0, n0 + nr) of a Q4_K or Q5_K weight into nb PanelKBlocks (rows nr..31 zero).
template <class WB, class Panel>
PARALLM_AVX2 void pack_panel_kmin(const Tensor& w, bool packed, int64_t n0, int nr, int64_t nb,
                                  Panel* out) {
  constexpr bool kQ5 = std::is_same_v<WB, quant::BlockQ5_K>;
  thread_local std::vector<char> tmp;
  const auto* rows = reinterpret_cast<const WB*>(plain_rows(w, packed, n0, nr, tmp, simd_unpack()));
  const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
  for (int64_t b = 0; b < nb; ++b) {
    PanelKBlock& p = out[b];
    for (int r0 = 0; r0 < kPanelRows; r0 += 8) {
      __m256i raw[4][8];  // chunk c (sub-blocks 2c, 2c + 1) of the 8 rows
      __m256i qh[8];      // Q5_K: the 8 rows' fifth bits
      for (int i = 0; i < 8; ++i) {
        const int r = r0 + i;
        if (r >= nr) {
          for (int c = 0; c < 4; ++c) raw[c][i] = _mm256_setzero_si256();
          qh[i] = _mm256_setzero_si256();
          for (int j = 0; j < 8; ++j) p.sc[j][r][0] = p.sc[j][r][1] = 0;
          for (int j = 0; j < 4; ++j) p.m[j][r][0] = p.m[j][r][1] = 0;
          p.d[r] = p.dmin[r] = 0.0f;
          continue;
        }
        const WB& blk = rows[r * nb + b];
        for (int c = 0; c < 4; ++c)
          raw[c][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 32 * c));
        if constexpr (kQ5) qh[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qh));
        uint8_t sc[8], m[8];
        q4k_scales_mins(blk.scales, sc, m);
        for (int j = 0; j < 8; ++j) p.sc[j][r][0] = p.sc[j][r][1] = sc[j];
        for (int j = 0; j < 4; ++j) {
          p.m[j][r][0] = m[2 * j];
          p.m[j][r][1] = m[2 * j + 1];
        }
        p.d[r] = f16_to_f32(blk.d);
        p.dmin[r] = f16_to_f32(blk.dmin);
      }
      for (int j = 0; j < 8; ++j) {  // low nibbles: sub-block 2c; high: 2c + 1
        __m256i v[8];
        for (int i = 0; i < 8; ++i) {
          v[i] =
              _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw[j / 2][i], 4) : raw[j / 2][i], low4);
          if constexpr (kQ5)  // bit j of each qh byte to bit 4 (16-bit shifts, see bit_to_4)
            v[i] = _mm256_or_si256(
                v[i], _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh[i], j), 4), bit4));
        }
        store_chunk8(v, p.codes, j, r0);
      }
    }
  }
}
PARALLM_AVX2 void pack_panel_k(const Tensor& w, bool packed, int64_t n0, int nr, int64_t nb,
                               PanelKBlock* out) {
  pack_panel_kmin<quant::BlockQ4_K>(w, packed, n0, nr, nb, out);
}
PARALLM_AVX2 void pack_panel_k(const Tensor& w, bool packed, int64_t n0, int nr, int64_t nb,
                               PanelK5Block* out) {
  pack_panel_kmin<quant::BlockQ5_K>(w, packed, n0, nr, nb, out);
}

// Q4_K's (Q5_K's) int32 q sums of one super-block for TT tokens (x: token t's block at
// x[t * nb]): per sub-block, the vpmaddubsw sums of kQuads quads in int16 (8 for Q4_K's codes
// 0..15, 4 for Q5_K's 0..31: see the bounds above), each scaled into the int32 sum.
template <int TT, int kQuads>
PARALLM_AVX2 static inline void kmin_block_sums_avx2(const PanelKBlock& pb,
                                                     const quant::BlockQ8_K* x, int64_t nb, int r0,
                                                     __m256i (&qs)[TT][2]) {
  for (int j = 0; j < 8; ++j) {
    const __m256i sc0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.sc[j][r0]));
    const __m256i sc1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.sc[j][r0 + 8]));
#pragma GCC unroll 2
    for (int k0 = 0; k0 < 8; k0 += kQuads) {
      __m256i s[TT][2];
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) s[t][0] = s[t][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int k = k0; k < k0 + kQuads; ++k) {
        const __m256i w0 =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.codes[8 * j + k][r0]));
        const __m256i w1 =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.codes[8 * j + k][r0 + 8]));
#pragma GCC unroll 4
        for (int t = 0; t < TT; ++t) {
          int32_t v;
          std::memcpy(&v, x[t * nb].qs + 32 * j + 4 * k, 4);
          const __m256i xv = _mm256_set1_epi32(v);
          s[t][0] = _mm256_add_epi16(s[t][0], _mm256_maddubs_epi16(w0, xv));
          s[t][1] = _mm256_add_epi16(s[t][1], _mm256_maddubs_epi16(w1, xv));
        }
      }
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) {
        qs[t][0] = _mm256_add_epi32(qs[t][0], _mm256_madd_epi16(s[t][0], sc0));
        qs[t][1] = _mm256_add_epi32(qs[t][1], _mm256_madd_epi16(s[t][1], sc1));
      }
    }
  }
}
template <int TT>
PARALLM_AVX2 static inline void kblock_sums_avx2(const PanelKBlock& pb, const quant::BlockQ8_K* x,
                                                 int64_t nb, int r0, __m256i (&qs)[TT][2]) {
  kmin_block_sums_avx2<TT, 8>(pb, x, nb, r0, qs);
}
template <int TT>
PARALLM_AVX2 static inline void kblock_sums_avx2(const PanelK5Block& pb, const quant::BlockQ8_K* x,
                                                 int64_t nb, int r0, __m256i (&qs)[TT][2]) {
  kmin_block_sums_avx2<TT, 4>(pb, x, nb, r0, qs);
}

// acc (16 rows of one token) += Q4_K's (or Q5_K's) block: d dx q - dmin dx (sum_j m_j bsum_j),
// kcombine's fmas in its order.
PARALLM_AVX2 static inline void kblock_combine_avx2(const PanelKBlock& pb,
                                                    const quant::BlockQ8_K& xb, int r0,
                                                    const __m256i (&q)[2], __m256 (&acc)[2]) {
  __m256i ms[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int j = 0; j < 4; ++j) {  // (m_2j, m_2j+1) against the sub-blocks' sums of x
    const int32_t lo = xb.bsums[4 * j] + xb.bsums[4 * j + 1];
    const int32_t hi = xb.bsums[4 * j + 2] + xb.bsums[4 * j + 3];
    const __m256i xs = _mm256_set1_epi32(static_cast<int32_t>(
        static_cast<uint32_t>(static_cast<uint16_t>(lo)) | (static_cast<uint32_t>(hi) << 16)));
    for (int h = 0; h < 2; ++h)
      ms[h] = _mm256_add_epi32(
          ms[h], _mm256_madd_epi16(
                     _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.m[j][r0 + 8 * h])), xs));
  }
  const __m256 dx = _mm256_set1_ps(xb.d);
  const __m256 neg = _mm256_set1_ps(-0.0f);
  for (int h = 0; h < 2; ++h) {
    const __m256 d = _mm256_load_ps(pb.d + r0 + 8 * h), m = _mm256_load_ps(pb.dmin + r0 + 8 * h);
    acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(q[h]), acc[h]);
    acc[h] = _mm256_fmadd_ps(_mm256_xor_ps(_mm256_mul_ps(m, dx), neg), _mm256_cvtepi32_ps(ms[h]),
                             acc[h]);
  }
}

// Q6_K the same way (value = d sc_g (q - 32), q in 0..63, sc_g int8, sub-blocks g of 16 = 4
// quads): the codes rebuilt as bytes 0..63 in the panel, vpmaddubsw of two quads against x summed
// in int16 (<= 2 x 2 x 63 x 127 = 32004, no saturation), one vpmaddwd by the row's scale per pair
// of quads into the int32 q sum; the -32 comes off once per block as 32 x sum_g sc_g bsum_g (8
// vpmaddwd of the scale pairs against the token's group sums, <= 16 x 127 = 2032, an int16).
// sum_g sc_g (sum q x - 32 bsum_g) is ksum_scalar's integer exactly (every term below 2^31, see
// the bounds above), combined with kcombine's fma: bit-identical to the scalar GEMV.
struct alignas(64) PanelK6Block {
  uint8_t codes[64][kPanelRows][4];
  int16_t sc[16][kPanelRows][2];  // sc_g twice
  int16_t scp[8][kPanelRows][2];  // (sc_2p, sc_2p+1)
  float d[kPanelRows];
};

// 6-bit codes as bytes: ql's low nibbles, qh's bits 4, 5 above them.
PARALLM_AVX2 static inline __m256i q6_code(__m256i ql, __m256i qh) {
  return _mm256_or_si256(_mm256_and_si256(ql, _mm256_set1_epi8(0x0F)),
                         _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
}

// Rows [n0, n0 + nr) of a Q6_K weight into nb PanelK6Blocks (rows nr..31 zero).
PARALLM_AVX2 void pack_panel_k(const Tensor& w, bool packed, int64_t n0, int nr, int64_t nb,
                               PanelK6Block* out) {
  thread_local std::vector<char> tmp;
  const auto* rows =
      reinterpret_cast<const quant::BlockQ6_K*>(plain_rows(w, packed, n0, nr, tmp, false));
  for (int64_t b = 0; b < nb; ++b) {
    PanelK6Block& p = out[b];
    for (int r0 = 0; r0 < kPanelRows; r0 += 8) {
      __m256i v[8][8];  // values 32c..32c+31 of the 8 rows
      for (int i = 0; i < 8; ++i) {
        const int r = r0 + i;
        if (r >= nr) {
          for (int c = 0; c < 8; ++c) v[c][i] = _mm256_setzero_si256();
          for (int g = 0; g < 16; ++g) p.sc[g][r][0] = p.sc[g][r][1] = 0;
          for (int j = 0; j < 8; ++j) p.scp[j][r][0] = p.scp[j][r][1] = 0;
          p.d[r] = 0.0f;
          continue;
        }
        const quant::BlockQ6_K& blk = rows[r * nb + b];
        for (int h = 0; h < 2; ++h) {  // ksum_scalar's layout: the high pairs to bits 4, 5
          const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.ql + 64 * h));
          const __m256i ql1 =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.ql + 64 * h + 32));
          const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qh + 32 * h));
          v[4 * h + 0][i] = q6_code(ql0, _mm256_slli_epi16(qh, 4));
          v[4 * h + 1][i] = q6_code(ql1, _mm256_slli_epi16(qh, 2));
          v[4 * h + 2][i] = q6_code(_mm256_srli_epi16(ql0, 4), qh);
          v[4 * h + 3][i] = q6_code(_mm256_srli_epi16(ql1, 4), _mm256_srli_epi16(qh, 2));
        }
        for (int g = 0; g < 16; ++g) p.sc[g][r][0] = p.sc[g][r][1] = blk.scales[g];
        for (int j = 0; j < 8; ++j) {
          p.scp[j][r][0] = blk.scales[2 * j];
          p.scp[j][r][1] = blk.scales[2 * j + 1];
        }
        p.d[r] = f16_to_f32(blk.d);
      }
      for (int c = 0; c < 8; ++c) store_chunk8(v[c], p.codes, c, r0);
    }
  }
}

// Q6_K's int32 sums of scale x code x activation of one super-block for TT tokens.
template <int TT>
PARALLM_AVX2 static inline void kblock_sums_avx2(const PanelK6Block& pb, const quant::BlockQ8_K* x,
                                                 int64_t nb, int r0, __m256i (&qs)[TT][2]) {
  for (int g = 0; g < 16; ++g) {
    const __m256i sc0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.sc[g][r0]));
    const __m256i sc1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.sc[g][r0 + 8]));
#pragma GCC unroll 2
    for (int k = 4 * g; k < 4 * g + 4; k += 2) {
      const auto* c = pb.codes;
      const __m256i w0a = _mm256_load_si256(reinterpret_cast<const __m256i*>(c[k][r0]));
      const __m256i w1a = _mm256_load_si256(reinterpret_cast<const __m256i*>(c[k][r0 + 8]));
      const __m256i w0b = _mm256_load_si256(reinterpret_cast<const __m256i*>(c[k + 1][r0]));
      const __m256i w1b = _mm256_load_si256(reinterpret_cast<const __m256i*>(c[k + 1][r0 + 8]));
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) {
        int32_t va, vb;
        std::memcpy(&va, x[t * nb].qs + 4 * k, 4);
        std::memcpy(&vb, x[t * nb].qs + 4 * k + 4, 4);
        const __m256i xa = _mm256_set1_epi32(va), xb = _mm256_set1_epi32(vb);
        const __m256i s0 =
            _mm256_add_epi16(_mm256_maddubs_epi16(w0a, xa), _mm256_maddubs_epi16(w0b, xb));
        const __m256i s1 =
            _mm256_add_epi16(_mm256_maddubs_epi16(w1a, xa), _mm256_maddubs_epi16(w1b, xb));
        qs[t][0] = _mm256_add_epi32(qs[t][0], _mm256_madd_epi16(s0, sc0));
        qs[t][1] = _mm256_add_epi32(qs[t][1], _mm256_madd_epi16(s1, sc1));
      }
    }
  }
}

// acc += Q6_K's block: d dx (q - 32 sum_g sc_g bsum_g), kcombine's fma.
PARALLM_AVX2 static inline void kblock_combine_avx2(const PanelK6Block& pb,
                                                    const quant::BlockQ8_K& xb, int r0,
                                                    const __m256i (&q)[2], __m256 (&acc)[2]) {
  __m256i os[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int j = 0; j < 8; ++j) {  // (sc_2j, sc_2j+1) against the groups' sums of x
    const __m256i xs = _mm256_set1_epi32(static_cast<int32_t>(
        static_cast<uint32_t>(static_cast<uint16_t>(xb.bsums[2 * j])) |
        (static_cast<uint32_t>(static_cast<uint16_t>(xb.bsums[2 * j + 1])) << 16)));
    for (int h = 0; h < 2; ++h)
      os[h] = _mm256_add_epi32(
          os[h],
          _mm256_madd_epi16(
              _mm256_load_si256(reinterpret_cast<const __m256i*>(pb.scp[j][r0 + 8 * h])), xs));
  }
  const __m256 dx = _mm256_set1_ps(xb.d);
  for (int h = 0; h < 2; ++h) {
    const __m256i qh = _mm256_sub_epi32(q[h], _mm256_slli_epi32(os[h], 5));
    const __m256 d = _mm256_load_ps(pb.d + r0 + 8 * h);
    acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(qh), acc[h]);
  }
}

// One 16-row half of a K-format panel (PanelKBlock: Q4_K, PanelK5Block: Q5_K, PanelK6Block: Q6_K)
// by TT tokens.
template <class Panel, int TT>
PARALLM_AVX2 void gemm_ktile_avx2(const Panel* p, int64_t nb, int half, const quant::BlockQ8_K* x,
                                  float* y, int64_t ldy, int nr, bool accumulate) {
  const int r0 = 16 * half;
  __m256 acc[TT][2];
#pragma GCC unroll 4
  for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i qs[TT][2];
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) qs[t][0] = qs[t][1] = _mm256_setzero_si256();
    kblock_sums_avx2<TT>(p[b], x + b, nb, r0, qs);
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) kblock_combine_avx2(p[b], x[t * nb + b], r0, qs[t], acc[t]);
  }
  store_rows16_avx2<TT>(acc, y + r0, ldy, nr, accumulate);
}

// The K-format GEMMs' driver: WB (Q4_K, Q5_K or Q6_K) picks the panel, its packing and its tile.
template <class WB>
void run_kgemm_avx2(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                    bool packed) {
  using Panel = std::conditional_t<
      std::is_same_v<WB, quant::BlockQ4_K>, PanelKBlock,
      std::conditional_t<std::is_same_v<WB, quant::BlockQ5_K>, PanelK5Block, PanelK6Block>>;
  const int64_t N = w.dim(0), K = w.dim(1), nb = K / 256;
  thread_local std::vector<quant::BlockQ8_K> xq;
  xq.resize(static_cast<size_t>(T * nb));
  quantize_activations_k(x, T, K, xq.data());
  const quant::BlockQ8_K* xp = xq.data();  // xq is this thread's; the pool's threads read it here
  for_each_panel<Panel>(
      N, nb, [&](int64_t n0, int nr, Panel* out) { pack_panel_k(w, packed, n0, nr, nb, out); },
      [&](const Panel* panel, int64_t n0, int nr) {
        for (int half = 0; half < 2 && 16 * half < nr; ++half) {
          const int hr = std::min(16, nr - 16 * half);
          int64_t t = 0;
          for (; t + 2 <= T; t += 2)
            gemm_ktile_avx2<Panel, 2>(panel, nb, half, xp + t * nb, y + t * N + n0, N, hr,
                                      accumulate);
          for (; t < T; ++t)
            gemm_ktile_avx2<Panel, 1>(panel, nb, half, xp + t * nb, y + t * N + n0, N, hr,
                                      accumulate);
        }
      });
}
#endif  // PARALLM_X86

void run_sgemm(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
               bool packed) {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });  // the pool owns the parallelism
  const int64_t N = w.dim(0), K = w.dim(1);
  const bool simd = simd_unpack();
  const int64_t block = std::clamp<int64_t>(kDequantBlockBytes / (K * 4) / 16 * 16, 16, 1024);
  const int64_t units = (N + 15) / 16;
  ThreadPool::current().parallel_for(units, [&](int64_t u0, int64_t u1) {
    const int64_t n0 = u0 * 16, n1 = std::min(N, u1 * 16);
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<size_t>(std::min(block, std::max<int64_t>(n1 - n0, 0)) * K));
    for (int64_t b = n0; b < n1; b += block) {
      const int64_t rows = std::min(block, n1 - b);
      thread_local std::vector<char> tmp;
      quant::dequantize(w.dtype(), plain_rows(w, packed, b, rows, tmp, simd), scratch.data(),
                        rows * K);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T),
                  static_cast<int>(rows), static_cast<int>(K), 1.0f, x, static_cast<int>(K),
                  scratch.data(), static_cast<int>(K), accumulate ? 1.0f : 0.0f, y + b,
                  static_cast<int>(N));
    }
  });
}

}  // namespace

std::string quant_path_name(QuantPath p) {
  switch (p) {
    case QuantPath::Scalar:
      return "scalar";
    case QuantPath::Avx2:
      return "avx2";
    case QuantPath::AvxVnni:
      return "avx-vnni";
    case QuantPath::Avx512Vnni:
      return "avx512-vnni";
  }
  return "?";
}

std::vector<QuantPath> quant_paths_available() {
  std::vector<QuantPath> out{QuantPath::Scalar};
  if (cpu_simd_level() >= SimdLevel::Avx2) out.push_back(QuantPath::Avx2);
  if (vnni().avxvnni) out.push_back(QuantPath::AvxVnni);
  if (vnni().avx512vnni) out.push_back(QuantPath::Avx512Vnni);
  return out;
}

QuantPath quant_path() {
  const SimdLevel level = simd_level();
  if (level == SimdLevel::Avx512 && vnni().avx512vnni) return QuantPath::Avx512Vnni;
  if (level >= SimdLevel::Avx2 && vnni().avxvnni) return QuantPath::AvxVnni;
  if (level >= SimdLevel::Avx2) return QuantPath::Avx2;
  return QuantPath::Scalar;
}

#if PARALLM_X86
namespace {
// roundf of 8 values (half away from zero), as std::roundf rounds: truncate, then one step away
// from zero when the exact remainder |v - t| is >= 0.5.
PARALLM_AVX2 static inline __m256 round_away_avx2(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(v, t)),
                                  _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  return _mm256_add_ps(
      t, _mm256_and_ps(up, _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(sign, v))));
}

// The largest of m's 8 lanes (all >= 0 here: maxima of |x|).
PARALLM_AVX2 static inline float hmax8(__m256 m) {
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
}

// quant::quantize_q8_k in AVX2, byte for byte: the same max |x| (max ignores NaN as std::max
// does: vmaxps returns its second operand, the running maximum, when the first is NaN), the same
// d, 1/d and products x * (1/d), roundf's half-away-from-zero (truncate, then one step away from
// zero when the exact remainder is >= 0.5), the int32 clamp to +-127 (cvttps gives INT_MIN for
// NaN, clamped to -127: the scalar code's code for NaN), and the group sums. Decode quantizes each
// token's activations on one thread before the GEMV's threads start; roundf, a library call per
// value, was ~2% of a Q4_K decode step.
PARALLM_AVX2 void quantize_q8_k_avx2(const float* x, quant::BlockQ8_K* y, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t b = 0; b < n / 256; ++b) {
    const float* xb = x + b * 256;
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < 256; j += 8)
      m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)), m);
    const float d = hmax8(m) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = d;
    const __m256 idv = _mm256_set1_ps(id);
    for (int g = 0; g < 16; ++g) {
      __m256i q[2];
      for (int h = 0; h < 2; ++h) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 16 * g + 8 * h), idv);
        q[h] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(round_away_avx2(v)), lo),
                                hi);
      }
      // 16 int32 -> 16 int8 in order (packs work within 128-bit lanes: put them back).
      const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
      const __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y[b].qs + 16 * g), b8);
      const __m256i s8 = _mm256_add_epi32(q[0], q[1]);
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      y[b].bsums[g] = static_cast<int16_t>(_mm_cvtsi128_si32(s4));
    }
  }
}

// quant::quantize_q8_0 in AVX2, byte for byte (the activations of the Q8_0 / Q4_0 GEMVs): the
// same max, d (f16 by f32_to_f16), 1/d, products and roundf; the scalar code codes NaN as 0, so
// INT_MIN lanes (cvttps' NaN) become 0 before the saturating packs.
PARALLM_AVX2 void quantize_q8_0_avx2(const float* x, BlockQ8_0* y, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i int_min = _mm256_set1_epi32(INT32_MIN);
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* xb = x + b * 32;
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int h = 0; h < 4; ++h) {
      v[h] = _mm256_loadu_ps(xb + 8 * h);
      m = _mm256_max_ps(_mm256_andnot_ps(sign, v[h]), m);
    }
    const float d = hmax8(m) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = f32_to_f16(d);
    const __m256 idv = _mm256_set1_ps(id);
    __m256i q[4];
    for (int h = 0; h < 4; ++h) {
      q[h] = _mm256_cvttps_epi32(round_away_avx2(_mm256_mul_ps(v[h], idv)));
      q[h] = _mm256_andnot_si256(_mm256_cmpeq_epi32(q[h], int_min), q[h]);
    }
    // packs interleave the 128-bit lanes: [0 1 4 5 | 2 3 6 7] in dwords after both; put back.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                         _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}
}  // namespace
#endif

void quantize_activations(const float* x, int64_t T, int64_t K, BlockQ8_0* out) {
  if (K % 32 != 0) fail("quant_matmul", "activation width ", K, " is not a multiple of 32");
#if PARALLM_X86
  if (simd_level() >= SimdLevel::Avx2) {
    for (int64_t t = 0; t < T; ++t) quantize_q8_0_avx2(x + t * K, out + t * (K / 32), K);
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t) quant::quantize_q8_0(x + t * K, out + t * (K / 32), K);
}

void quantize_activations_k(const float* x, int64_t T, int64_t K, quant::BlockQ8_K* out) {
  if (K % 256 != 0) fail("quant_matmul", "activation width ", K, " is not a multiple of 256");
#if PARALLM_X86
  if (simd_level() >= SimdLevel::Avx2) {
    for (int64_t t = 0; t < T; ++t) quantize_q8_k_avx2(x + t * K, out + t * (K / 256), K);
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t) quant::quantize_q8_k(x + t * K, out + t * (K / 256), K);
}

namespace {
void check_weight(const Tensor& w) {
  if (!w.defined() || w.ndim() != 2 || !w.is_contiguous() || !is_block(w.dtype()))
    fail("quant_matmul", "weight must be a contiguous 2-D block-quantized [N, K] tensor, got ",
         w.defined() ? w.describe() : std::string("an undefined tensor"));
}
}  // namespace

std::string quant_matmul_kernel(DType type, int64_t T, QuantPath path) {
  switch (int8_gemm_for(type, T, path)) {
    case Int8Gemm::Avx512Vnni:
      return "int8-gemm-avx512-vnni";
    case Int8Gemm::Avx2:
      return "int8-gemm-avx2";
    case Int8Gemm::None:
      break;
  }
  if (T >= kSgemmMinT) return kformat_bf16_gemm_runs(type) ? "bf16-gemm-avx512" : "sgemm";
  const bool kformat = dtype_block(type) == 256;
  if (kformat && path != QuantPath::Scalar) return "int8-avx2";
  return "int8-" + quant_path_name(path);
}

void quant_matmul_dequant(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate) {
  check_weight(w);
  if (T < 0) fail("quant_matmul", "T must be >= 0, got ", T);
  if (T == 0 || w.dim(0) == 0) return;
  run_dequant(x, T, w, y, accumulate, lookup_packed(w));
}

void quant_matmul(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                  QuantPath path) {
  check_weight(w);
  const auto avail = quant_paths_available();
  if (std::find(avail.begin(), avail.end(), path) == avail.end())
    fail("quant_matmul", "path ", quant_path_name(path), " is not supported by this CPU");
  if (T < 0) fail("quant_matmul", "T must be >= 0, got ", T);
  if (T == 0 || w.dim(0) == 0) return;
  if (w.dim(1) == 0) {
    if (!accumulate) std::fill(y, y + T * w.dim(0), 0.0f);
    return;
  }
  const bool packed = lookup_packed(w);
#if PARALLM_X86
  switch (int8_gemm_for(w.dtype(), T, path)) {
    case Int8Gemm::Avx512Vnni:
      return w.dtype() == DType::Q8_0 ? run_gemm_512<BlockQ8_0>(x, T, w, y, accumulate, packed)
                                      : run_gemm_512<BlockQ4_0>(x, T, w, y, accumulate, packed);
    case Int8Gemm::Avx2:
      if (w.dtype() == DType::Q4_K)
        return run_kgemm_avx2<quant::BlockQ4_K>(x, T, w, y, accumulate, packed);
      if (w.dtype() == DType::Q5_K)
        return run_kgemm_avx2<quant::BlockQ5_K>(x, T, w, y, accumulate, packed);
      if (w.dtype() == DType::Q6_K)
        return run_kgemm_avx2<quant::BlockQ6_K>(x, T, w, y, accumulate, packed);
      return w.dtype() == DType::Q8_0 ? run_gemm_avx2<BlockQ8_0>(x, T, w, y, accumulate, packed)
                                      : run_gemm_avx2<BlockQ4_0>(x, T, w, y, accumulate, packed);
    case Int8Gemm::None:
      break;
  }
#endif
  if (T >= kSgemmMinT) {
    if (kformat_bf16_gemm_runs(w.dtype())) {
      const bool simd = simd_unpack();
      return bf16_gemm_f32_rows(x, T, w.dim(1), w.dim(0), y, accumulate,
                                [&](int64_t n0, int nr, float* out) {
                                  thread_local std::vector<char> tmp;
                                  quant::dequantize(w.dtype(),
                                                    plain_rows(w, packed, n0, nr, tmp, simd), out,
                                                    nr * w.dim(1));
                                });
    }
    return run_sgemm(x, T, w, y, accumulate, packed);
  }
  switch (w.dtype()) {
    case DType::Q8_0:
      return run_blocks<BlockQ8_0>(x, T, w, y, accumulate, path, packed);
    case DType::Q4_0:
      return run_blocks<BlockQ4_0>(x, T, w, y, accumulate, path, packed);
    case DType::Q4_K:
      return run_kblocks<quant::BlockQ4_K>(x, T, w, y, accumulate, path, packed);
    case DType::Q5_K:
      return run_kblocks<quant::BlockQ5_K>(x, T, w, y, accumulate, path, packed);
    case DType::Q6_K:
      return run_kblocks<quant::BlockQ6_K>(x, T, w, y, accumulate, path, packed);
    default:
      return run_dequant(x, T, w, y, accumulate, packed);
  }
}

// The dtypes that have a repacked layout (the groups above).
static bool quant_repack_layout(DType type) {
  return type == DType::Q4_0 || type == DType::Q8_0 || type == DType::Q4_K || type == DType::Q5_K ||
         type == DType::Q6_K;
}

bool quant_repack_enabled(DType type) {
  // Read at each call (per weight at load), so a test can compare both layouts in one process.
  const char* e = std::getenv("PARALLM_REPACK");
  if (e != nullptr && std::strcmp(e, "0") != 0 && std::strcmp(e, "1") != 0)
    fail("quant_matmul", "PARALLM_REPACK must be 0 or 1, got \"", e, "\"");
  if (e != nullptr && std::strcmp(e, "0") == 0) return false;
  return quant_repack_layout(type) && quant_path() != QuantPath::Scalar;
}

bool is_repacked(const Tensor& w) {
  return w.defined() && w.ndim() == 2 && w.raw() != nullptr && lookup_packed(w);
}

Tensor repack_quant_weight(const Tensor& w) {
  if (!w.defined() || w.ndim() != 2 || !w.is_contiguous() || w.raw() == nullptr) return w;
  const DType type = w.dtype();
  if (!quant_repack_layout(type) || w.dim(0) < kRows || w.dim(1) == 0 || is_repacked(w)) return w;
  const int64_t N = w.dim(0), K = w.dim(1), nb = K / dtype_block(type);
  const size_t bytes = w.nbytes();
  char* buf = static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
  if (buf == nullptr) fail("quant_matmul", "cannot allocate ", bytes, " bytes to repack ",
                           w.describe());
  const char* src = static_cast<const char*>(w.raw());
  const int64_t groups = N / kRows;
  const size_t row_bytes = dtype_bytes(type, K);
  // Groups over the pool (a 7B model's matrices are GBs); the tail rows copied as they are.
  ThreadPool::current().parallel_for(groups, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi) {
      if (type == DType::Q6_K) {
        for (int64_t b = 0; b < nb; ++b)
          for (int r = 0; r < kRows; ++r)
            reinterpret_cast<GroupQ6_K*>(buf)[gi * nb + b].blk[r] =
                reinterpret_cast<const quant::BlockQ6_K*>(src + (gi * kRows + r) * row_bytes)[b];
      } else if (type == DType::Q5_K) {
        const quant::BlockQ5_K* rows[kRows];
        for (int64_t b = 0; b < nb; ++b) {
          for (int r = 0; r < kRows; ++r)
            rows[r] =
                reinterpret_cast<const quant::BlockQ5_K*>(src + (gi * kRows + r) * row_bytes) + b;
          GroupQ5_K& g = reinterpret_cast<GroupQ5_K*>(buf)[gi * nb + b];
          pack_group_k(rows, g.k4);
          pack_group_qh(rows, g);
        }
      } else if (type == DType::Q4_K) {
        const quant::BlockQ4_K* rows[kRows];
        for (int64_t b = 0; b < nb; ++b) {
          for (int r = 0; r < kRows; ++r)
            rows[r] = reinterpret_cast<const quant::BlockQ4_K*>(src + (gi * kRows + r) *
                                                                         row_bytes) + b;
          pack_group_k(rows, reinterpret_cast<GroupQ4_K*>(buf)[gi * nb + b]);
        }
      } else if (type == DType::Q8_0) {
        const BlockQ8_0* rows[kRows];
        for (int64_t b = 0; b < nb; ++b) {
          for (int r = 0; r < kRows; ++r)
            rows[r] = reinterpret_cast<const BlockQ8_0*>(src + (gi * kRows + r) * row_bytes) + b;
          pack_group<BlockQ8_0>(rows, reinterpret_cast<GroupQ8_0*>(buf)[gi * nb + b]);
        }
      } else {
        const BlockQ4_0* rows[kRows];
        for (int64_t b = 0; b < nb; ++b) {
          for (int r = 0; r < kRows; ++r)
            rows[r] = reinterpret_cast<const BlockQ4_0*>(src + (gi * kRows + r) * row_bytes) + b;
          pack_group<BlockQ4_0>(rows, reinterpret_cast<GroupQ4_0*>(buf)[gi * nb + b]);
        }
      }
    }
  });
  const size_t packed_bytes = static_cast<size_t>(groups * kRows) * row_bytes;
  std::memcpy(buf + packed_bytes, src + packed_bytes, bytes - packed_bytes);
  {
    std::unique_lock lock(packed_mu());
    packed_map()[buf] = PackedEntry{buf + bytes, N, K, type};
  }
  std::shared_ptr<void> keep(buf, [](void* p) {
    {
      std::unique_lock lock(packed_mu());
      packed_map().erase(static_cast<const char*>(p));
    }
    std::free(p);
  });
  return Tensor::borrow(buf, type, {N, K}, std::move(keep));
}

}  // namespace parallm::kernels
