// Quantized GEMV / GEMM (see quant_matmul.h).
//
// Work unit: a tile of R = 4 rows of W against one token; the tokens are the inner loop, so a
// tile's rows (K/32 blocks each: 4.25 KiB at K = 4096 for Q8_0) come from memory once and from
// L1/L2 for the later tokens. Rows are split statically over the pool (memory-bound, as the f32
// GEMV). The activations are quantized once per call by the calling thread.
#include "parallm/kernels/quant_matmul.h"

#include <algorithm>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/cpu.h"
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
void tile_scalar(const WB* const* w, int rows, const BlockQ8_0* x, int64_t nb, float* out) {
  for (int r = 0; r < rows; ++r) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b)
      acc += f16_to_f32(w[r][b].d) * f16_to_f32(x[b].d) * static_cast<float>(block_isum(w[r][b], x[b]));
    out[r] = acc;
  }
}

#if PARALLM_X86
// 32 weight codes of a block as signed bytes.
template <class WB>
PARALLM_AVX2 static inline __m256i codes_avx2(const WB& w) {
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, m);                     // values 0..15
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);  // values 16..31
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
  }
}

PARALLM_AVX2 static inline float scale2(uint16_t a, uint16_t b) {
  return _cvtsh_ss(a) * _cvtsh_ss(b);
}

// maddubs needs one unsigned operand: |w| as unsigned, x with w's sign moved onto it. |w| <= 128
// and |x| <= 127, so the pairwise i16 sums (<= 2 * 128 * 127) never saturate.
template <class WB>
PARALLM_AVX2 void tile_avx2(const WB* const* w, int rows, const BlockQ8_0* x, int64_t nb,
                            float* out) {
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  if (rows == kRows) {
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m256i wv = codes_avx2(w[r][b]);
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale2(w[r][b].d, x[b].d)), s, acc[r]);
      }
    }
  } else {
    for (int r = 0; r < rows; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
        const __m256i wv = codes_avx2(w[r][b]);
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale2(w[r][b].d, x[b].d)), s, acc[r]);
      }
  }
  for (int r = 0; r < rows; ++r) out[r] = simd::hsum8(acc[r]);
}

// AVX-VNNI: vpdpbusd sums the four u8 x s8 products per 32-bit lane in one instruction, without
// the i16 intermediate.
template <class WB>
PARALLM_AVXVNNI static inline __m256i codes_vnni(const WB& w) {
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, m);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
  }
}

template <class WB>
PARALLM_AVXVNNI void tile_avxvnni(const WB* const* w, int rows, const BlockQ8_0* x, int64_t nb,
                                  float* out) {
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int r0 = 0; r0 < rows; r0 += (rows == kRows ? kRows : 1)) {
    const int rn = rows == kRows ? kRows : 1;
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
      const float dx = _cvtsh_ss(x[b].d);
#pragma GCC unroll 4
      for (int i = 0; i < rn; ++i) {
        const int r = r0 + i;
        const __m256i wv = codes_vnni(w[r][b]);
        const __m256i p = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(),
                                                  _mm256_sign_epi8(wv, wv),
                                                  _mm256_sign_epi8(xv, wv));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[r][b].d) * dx),
                                 _mm256_cvtepi32_ps(p), acc[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) out[r] = simd::hsum8(acc[r]);
}

// AVX-512 VNNI: two blocks per 512-bit register (blocks b and b+1 of one row), |w| by vpabsb and
// x negated where w < 0 by a masked subtract (AVX-512 has no vpsignb).
template <class WB>
PARALLM_AVX512VNNI static inline __m256i codes_512(const WB& w) {
  if constexpr (std::is_same_v<WB, BlockQ8_0>) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, m);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
  }
}

PARALLM_AVX512VNNI static inline __m512i pair512(__m256i a, __m256i b) {
  // Zero-masked forms: GCC 12's unmasked ones pass an "undefined" register -Wuninitialized sees.
  return _mm512_mask_broadcast_i64x4(_mm512_maskz_broadcast_i64x4(0x0F, a), 0xF0, b);
}

template <class WB>
PARALLM_AVX512VNNI void tile_avx512vnni(const WB* const* w, int rows, const BlockQ8_0* x,
                                        int64_t nb, float* out) {
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  __m256 tail[kRows];
  for (int r = 0; r < kRows; ++r) tail[r] = _mm256_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int r0 = 0; r0 < rows; r0 += (rows == kRows ? kRows : 1)) {
    const int rn = rows == kRows ? kRows : 1;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      const __m512i xv =
          pair512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs)),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b + 1].qs)));
      const float dx0 = _cvtsh_ss(x[b].d), dx1 = _cvtsh_ss(x[b + 1].d);
#pragma GCC unroll 4
      for (int i = 0; i < rn; ++i) {
        const int r = r0 + i;
        const __m512i wv = pair512(codes_512(w[r][b]), codes_512(w[r][b + 1]));
        const __mmask64 neg = _mm512_movepi8_mask(wv);
        const __m512i sx = _mm512_mask_sub_epi8(xv, neg, zero, xv);
        const __m512i p = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), sx);
        const __m512 sc = _mm512_maskz_insertf32x8(
            simd::kAll16, _mm512_set1_ps(_cvtsh_ss(w[r][b].d) * dx0),
            _mm256_set1_ps(_cvtsh_ss(w[r][b + 1].d) * dx1), 1);
        acc[r] = _mm512_fmadd_ps(sc, _mm512_maskz_cvtepi32_ps(simd::kAll16, p), acc[r]);
      }
    }
    for (; b < nb; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
      for (int i = 0; i < rn; ++i) {
        const int r = r0 + i;
        const __m256i wv = codes_512(w[r][b]);
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv),
                                              _mm256_sign_epi8(xv, wv));
        tail[r] = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[r][b].d) * _cvtsh_ss(x[b].d)),
                                  _mm256_cvtepi32_ps(p), tail[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) out[r] = simd::hsum16(acc[r]) + simd::hsum8(tail[r]);
}
#endif  // PARALLM_X86

template <class WB>
using TileFn = void (*)(const WB* const*, int, const BlockQ8_0*, int64_t, float*);

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
  v.avxvnni = cpu_simd_level() >= SimdLevel::Avx2 && __builtin_cpu_supports("avxvnni");
#endif
  return v;
}
const CpuVnni& vnni() {
  static const CpuVnni v = detect_vnni();
  return v;
}

template <class WB>
void run_blocks(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                QuantPath path) {
  const int64_t N = w.dim(0), K = w.dim(1), nb = K / 32;
  thread_local std::vector<BlockQ8_0> xq_buf;
  xq_buf.resize(static_cast<size_t>(T * nb));
  quantize_activations(x, T, K, xq_buf.data());
  const BlockQ8_0* xq = xq_buf.data();
  const WB* wb = static_cast<const WB*>(w.raw());
  const TileFn<WB> tile = tile_for<WB>(path);
  const int64_t tiles = (N + kRows - 1) / kRows;
  ThreadPool::current().parallel_for(tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t n0 = ti * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      const WB* rowp[kRows];
      for (int r = 0; r < rows; ++r) rowp[r] = wb + (n0 + r) * nb;
      for (int64_t t = 0; t < T; ++t) {
        float out[kRows];
        tile(rowp, rows, xq + t * nb, nb, out);
        float* yt = y + t * N + n0;
        for (int r = 0; r < rows; ++r) yt[r] = accumulate ? yt[r] + out[r] : out[r];
      }
    }
  });
}

// Q4_K / Q6_K: each row dequantized to f32 once, then a plain dot product per token.
void run_dequant(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate) {
  const int64_t N = w.dim(0), K = w.dim(1);
  const size_t row_bytes = dtype_bytes(w.dtype(), K);
  ThreadPool::current().parallel_for(N, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      quant::dequantize(w.dtype(), static_cast<const char*>(w.raw()) + n * row_bytes, row.data(),
                        K);
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

void quantize_activations(const float* x, int64_t T, int64_t K, BlockQ8_0* out) {
  if (K % 32 != 0) fail("quant_matmul", "activation width ", K, " is not a multiple of 32");
  for (int64_t t = 0; t < T; ++t) quant::quantize_q8_0(x + t * K, out + t * (K / 32), K);
}

void quant_matmul(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                  QuantPath path) {
  if (!w.defined() || w.ndim() != 2 || !w.is_contiguous() || !is_block(w.dtype()))
    fail("quant_matmul", "weight must be a contiguous 2-D block-quantized [N, K] tensor, got ",
         w.defined() ? w.describe() : std::string("an undefined tensor"));
  const auto avail = quant_paths_available();
  if (std::find(avail.begin(), avail.end(), path) == avail.end())
    fail("quant_matmul", "path ", quant_path_name(path), " is not supported by this CPU");
  if (T < 0) fail("quant_matmul", "T must be >= 0, got ", T);
  if (T == 0 || w.dim(0) == 0) return;
  if (w.dim(1) == 0) {
    if (!accumulate) std::fill(y, y + T * w.dim(0), 0.0f);
    return;
  }
  switch (w.dtype()) {
    case DType::Q8_0:
      return run_blocks<BlockQ8_0>(x, T, w, y, accumulate, path);
    case DType::Q4_0:
      return run_blocks<BlockQ4_0>(x, T, w, y, accumulate, path);
    default:
      return run_dequant(x, T, w, y, accumulate);
  }
}

}  // namespace parallm::kernels
