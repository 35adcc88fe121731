// Internal to kernels/: target attributes and small SIMD helpers shared by the fast paths.
//
// The project is compiled for baseline x86-64, so every function that uses AVX2 or AVX-512
// intrinsics carries a target attribute and is only called after cpu.h's run-time check chose that
// level. Helpers called from such functions carry the same attribute (GCC refuses to inline across
// target mismatches). Only internal-linkage or non-inline functions get these attributes, so the
// linker can never pick an AVX2 copy of a shared inline function for baseline code.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#define PARALLM_X86 1
#include <immintrin.h>
#define PARALLM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PARALLM_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#else
#define PARALLM_X86 0
#endif

namespace parallm::kernels::simd {

#if PARALLM_X86

// Sum of the 8 lanes.
PARALLM_AVX2 static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The AVX-512 helpers use the zero-masked forms of the intrinsics: GCC 12's unmasked forms pass an
// "undefined" register that -Wuninitialized reports at every use.
constexpr __mmask16 kAll16 = 0xffff;

PARALLM_AVX512 static inline float hsum16(__m512 v) {
  __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 0));
  __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 1));
  return hsum8(_mm256_add_ps(lo, hi));
}

// A GEMM tile's results for 32 consecutive outputs of TT rows (the prefill GEMMs' panels of 32
// weight rows): acc[t][0..1] to y[t * ldy + 0..31], only the first nr (<= 32) of them, added to
// what is there when `accumulate`.
template <int TT>
PARALLM_AVX512 static inline void store_rows32(const __m512 (&acc)[TT][2], float* y, int64_t ldy,
                                               int nr, bool accumulate) {
  const __mmask16 m0 = static_cast<__mmask16>(nr >= 16 ? 0xFFFF : (1u << nr) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(nr >= 32   ? 0xFFFF
                                              : nr <= 16 ? 0
                                                         : (1u << (nr - 16)) - 1);
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) {
    float* yt = y + t * ldy;
    __m512 v0 = acc[t][0], v1 = acc[t][1];
    if (accumulate) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, yt), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, yt + 16), v1);
    }
    _mm512_mask_storeu_ps(yt, m0, v0);
    _mm512_mask_storeu_ps(yt + 16, m1, v1);
  }
}

// Weight loaders: 8 (AVX2) or 16 (AVX-512) consecutive weights widened to f32.
// bf16 is the top half of an f32: zero-extend each 16-bit value to 32 bits and shift left 16.
PARALLM_AVX2 static inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
PARALLM_AVX2 static inline __m256 load8_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
PARALLM_AVX2 static inline __m256 load8_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

PARALLM_AVX512 static inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
PARALLM_AVX512 static inline __m512 load16_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(
      _mm512_maskz_slli_epi32(kAll16, _mm512_maskz_cvtepu16_epi32(kAll16, h), 16));
}
PARALLM_AVX512 static inline __m512 load16_f16(const uint16_t* p) {
  return _mm512_maskz_cvtph_ps(kAll16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// e^x for 8 lanes, within 2 ulp of expf over the range that matters: x is clamped to
// [-87.3, 88.37], so results below ~1e-38 come back as ~1e-38 instead of 0 (harmless in a
// softmax sum or a sigmoid) and large x saturates at ~2.4e38 instead of inf. Cephes' method: x = n
// ln2 + r with |r| <= ln2/2 (ln2 split in two parts so n*ln2 is exact), e^r by a degree-7
// polynomial, 2^n by building the exponent bits.
PARALLM_AVX2 static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // n in [-126, 127]: 2^n built directly as float bits.
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#endif  // PARALLM_X86

}  // namespace parallm::kernels::simd
