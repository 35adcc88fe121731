// y = x W^T for x [T, K] f32 and W [N, K] in f32 / bf16 / f16.
//
// Two paths:
// - few tokens (T < kSgemmMinT: decoding, small batches): a GEMV that streams W once. Each call of
//   a "tile" computes R rows of W against up to 4 tokens, holding R x TT accumulators of 8 (AVX2)
//   or 16 (AVX-512) lanes in registers, so each loaded weight vector feeds TT FMAs and each loaded
//   x vector feeds R FMAs. For T > 4 the token chunks are the inner loop, so the R rows of W are
//   read from memory once and from L1/L2 for the later chunks.
// - many tokens (prefill): OpenBLAS sgemm per thread on its own rows of W; 16-bit weights are
//   widened to f32 a block of rows at a time into a per-thread scratch buffer.
// Threads: rows of W are split statically over ThreadPool::current(), each thread streaming its
// own contiguous rows (memory-bound: static beats dynamic).
#include "parallm/kernels/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#include "parallm/core/aligned.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/quant_matmul.h"
#include "parallm/kernels/simd.h"

namespace parallm::kernels {
namespace {

// Tokens from which sgemm (with bf16 widened per call) beats the chunked GEMV: measured on Zen 3
// with bf16 [2048, 2048], GEMV 78 vs sgemm 62 GFLOP/s at T = 48, 75 vs 73 at T = 64 (see
// docs/benchmarks.md).
constexpr int64_t kSgemmMinT = kGemvMaxTokens;
// sgemm on fewer rows of W than this per thread runs well below OpenBLAS's speed (measured: half at
// 128 rows); below it the tokens are split across threads instead.
constexpr int64_t kSgemmMinRowsPerThread = 512;
// Rows per unit of the static split; a multiple of every tile height.
constexpr int64_t kRowUnit = 16;
// Scratch for widened 16-bit weights: up to this many bytes of f32 per block and thread. Each
// sgemm call packs all of x again, so blocks must hold many rows (up to kWidenBlockMaxRows) for
// that to be a small cost next to the block's 2*T*rows*K flops.
constexpr int64_t kWidenBlockBytes = int64_t{8} << 20;
constexpr int64_t kWidenBlockMaxRows = 1024;

enum class WKind { F32, BF16, F16 };

inline float scalar_weight(const void* w, WKind kind, int64_t i) {
  switch (kind) {
    case WKind::F32:
      return static_cast<const float*>(w)[i];
    case WKind::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
    case WKind::F16:
      return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
  }
  return 0.0f;
}

// Arguments of one tile: rows [0, R) of w (row stride K) against tokens [0, TT) of x (row stride
// ldx), results to y[t * ldy + r].
struct TileArgs {
  const float* x;
  int64_t ldx;
  const void* w;  // first row of the tile
  int64_t K;
  int64_t ldw;  // elements from one row of the tile to the next
  float* y;     // y of token 0, row 0 of the tile
  int64_t ldy;
  int64_t ldr;  // y elements from one row of the tile to the next
  bool accumulate;
};

inline void store_tile(const TileArgs& a, int64_t t, int64_t r, float v) {
  float& out = a.y[t * a.ldy + r * a.ldr];
  out = a.accumulate ? out + v : v;
}

// ---- scalar: 8 partial sums per (token, row) so the compiler can use SSE without reassociating.
template <WKind KW, int R, int TT>
void tile_scalar(const TileArgs& a) {
  float acc[TT][R][8] = {};
  const int64_t K = a.K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int r = 0; r < R; ++r) {
      float wv[8];
      for (int j = 0; j < 8; ++j) wv[j] = scalar_weight(a.w, KW, r * a.ldw + k + j);
      for (int t = 0; t < TT; ++t)
        for (int j = 0; j < 8; ++j) acc[t][r][j] += wv[j] * a.x[t * a.ldx + k + j];
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) {
      float s = 0;
      for (int j = 0; j < 8; ++j) s += acc[t][r][j];
      for (int64_t kk = k; kk < K; ++kk)
        s += scalar_weight(a.w, KW, r * a.ldw + kk) * a.x[t * a.ldx + kk];
      store_tile(a, t, r, s);
    }
}

#if PARALLM_X86
template <WKind KW>
PARALLM_AVX2 static inline __m256 wload8(const void* w, int64_t i) {
  if constexpr (KW == WKind::F32) {
    return simd::load8(static_cast<const float*>(w) + i);
  } else if constexpr (KW == WKind::BF16) {
    return simd::load8_bf16(static_cast<const uint16_t*>(w) + i);
  } else {
    return simd::load8_f16(static_cast<const uint16_t*>(w) + i);
  }
}

// Each stream (row of a tile) is prefetched this far ahead into L2. The hardware prefetchers
// alone leave DRAM bandwidth unused here: a bf16 GEMV spends ~10 instructions per cache line, so
// the out-of-order window covers too few lines to keep enough misses in flight. Measured on Zen 3
// (see docs/benchmarks.md): +10-20% for bf16; 1024 bytes = 16 lines per stream.
constexpr int64_t kPrefetchBytes = 1024;

template <int R>
static inline void prefetch_rows(const char* p, int64_t row_bytes) {
#if PARALLM_X86
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm_prefetch(p + r * row_bytes + kPrefetchBytes, _MM_HINT_T1);
#endif
}

// acc[t][r] += x[t, k:k+8] * w[r, k:k+8], rows ldw elements apart
template <WKind KW, int R, int TT>
PARALLM_AVX2 __attribute__((always_inline)) static inline void fma_step8(__m256 (&acc)[TT][R],
                                                                         const float* x,
                                                                         int64_t ldx, const void* w,
                                                                         int64_t ldw, int64_t k) {
  __m256 xv[TT];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + k);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m256 wv = wload8<KW>(w, r * ldw + k);
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[t][r] = _mm256_fmadd_ps(wv, xv[t], acc[t][r]);
  }
}

// bf16 weights, 16 at a time without a shuffle: in each 32-bit lane of a 16-weight load the even
// weight is the low half and the odd one the high half, so a left shift by 16 gives the 8 even
// weights as f32 and masking the low half gives the 8 odd ones. x must then be laid out to match
// (permute_x: in each block of 16, the 8 even elements, then the 8 odd ones). Two cheap ALU ops per
// 16 weights instead of two shuffles and two shifts: fewer instructions per cache line lets the
// core keep more lines in flight, which is what a memory-bound GEMV needs.
template <int R, int TT>
PARALLM_AVX2 __attribute__((always_inline)) static inline void bf16_step16(
    __m256 (&acc)[TT][R], const float* xp, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t k,
    __m256i hi_mask) {
  __m256 xe[TT], xo[TT];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    xe[t] = _mm256_loadu_ps(xp + t * ldx + k);
    xo[t] = _mm256_loadu_ps(xp + t * ldx + k + 8);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + k));
    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[t][r] = _mm256_fmadd_ps(even, xe[t], acc[t][r]);
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[t][r] = _mm256_fmadd_ps(odd, xo[t], acc[t][r]);
  }
}

template <WKind KW, int R, int TT>
PARALLM_AVX2 void tile_avx2(const TileArgs& a) {
  constexpr int64_t es = KW == WKind::F32 ? 4 : 2;
  __m256 acc[TT][R];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  const int64_t K = a.K;
  const float* x = a.x;
  const char* wb = static_cast<const char*>(a.w);
  int64_t k = 0;
  if constexpr (KW == WKind::BF16) {
    // x is permuted in blocks of 16 (see permute_x); the tail after the last block is not.
    const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const uint16_t* w = static_cast<const uint16_t*>(a.w);
    for (; k + 32 <= K; k += 32) {  // a cache line per row
      prefetch_rows<R>(wb + k * es, a.ldw * es);
      bf16_step16<R, TT>(acc, x, a.ldx, w, a.ldw, k, hi_mask);
      bf16_step16<R, TT>(acc, x, a.ldx, w, a.ldw, k + 16, hi_mask);
    }
    for (; k + 16 <= K; k += 16) bf16_step16<R, TT>(acc, x, a.ldx, w, a.ldw, k, hi_mask);
  } else {
    constexpr int64_t line = 64 / es;
    for (; k + line <= K; k += line) {
      prefetch_rows<R>(wb + k * es, a.ldw * es);
#pragma GCC unroll 4
      for (int64_t j = 0; j < line; j += 8) fma_step8<KW, R, TT>(acc, x, a.ldx, a.w, a.ldw, k + j);
    }
  }
  for (; k + 8 <= K; k += 8) fma_step8<KW, R, TT>(acc, x, a.ldx, a.w, a.ldw, k);
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) {
      float s = simd::hsum8(acc[t][r]);
      for (int64_t kk = k; kk < K; ++kk)
        s += scalar_weight(a.w, KW, r * a.ldw + kk) * x[t * a.ldx + kk];
      store_tile(a, t, r, s);
    }
}

template <WKind KW>
PARALLM_AVX512 static inline __m512 wload16(const void* w, int64_t i) {
  if constexpr (KW == WKind::F32) {
    return simd::load16(static_cast<const float*>(w) + i);
  } else if constexpr (KW == WKind::BF16) {
    return simd::load16_bf16(static_cast<const uint16_t*>(w) + i);
  } else {
    return simd::load16_f16(static_cast<const uint16_t*>(w) + i);
  }
}

// bf16_step16's trick on AVX-512: a 64-byte load is a cache line of one row (32 weights), a shift
// and a mask give its 16 even and 16 odd weights as f32, and x is permuted in blocks of 32.
template <int R, int TT>
PARALLM_AVX512 __attribute__((always_inline)) static inline void bf16_step32(
    __m512 (&acc)[TT][R], const float* xp, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t k,
    __m512i hi_mask) {
  __m512 xe[TT], xo[TT];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    xe[t] = _mm512_loadu_ps(xp + t * ldx + k);
    xo[t] = _mm512_loadu_ps(xp + t * ldx + k + 16);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512i v = _mm512_loadu_si512(w + r * ldw + k);
    const __m512 even = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(simd::kAll16, v, 16));
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[t][r] = _mm512_fmadd_ps(even, xe[t], acc[t][r]);
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[t][r] = _mm512_fmadd_ps(odd, xo[t], acc[t][r]);
  }
}

template <WKind KW, int R, int TT>
PARALLM_AVX512 void tile_avx512(const TileArgs& a) {
  constexpr int64_t es = KW == WKind::F32 ? 4 : 2;
  __m512 acc[TT][R];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const int64_t K = a.K;
  const float* x = a.x;
  const char* wb = static_cast<const char*>(a.w);
  int64_t k = 0;
  if constexpr (KW == WKind::BF16) {
    // x is permuted in blocks of 32 (see permute_x); the tail after the last block is not.
    const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const uint16_t* w = static_cast<const uint16_t*>(a.w);
    for (; k + 32 <= K; k += 32) {  // a cache line per row
      prefetch_rows<R>(wb + k * es, a.ldw * es);
      bf16_step32<R, TT>(acc, x, a.ldx, w, a.ldw, k, hi_mask);
    }
  }
  for (; k + 16 <= K; k += 16) {
    // One prefetch per 16 weights: per cache line for f32, twice per line for f16.
    prefetch_rows<R>(wb + k * es, a.ldw * es);
    __m512 xv[TT];
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) xv[t] = _mm512_loadu_ps(x + t * a.ldx + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 wv = wload16<KW>(a.w, r * a.ldw + k);
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) acc[t][r] = _mm512_fmadd_ps(wv, xv[t], acc[t][r]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) {
      float s = simd::hsum16(acc[t][r]);
      for (int64_t kk = k; kk < K; ++kk)
        s += scalar_weight(a.w, KW, r * a.ldw + kk) * x[t * a.ldx + kk];
      store_tile(a, t, r, s);
    }
}
#endif  // PARALLM_X86

using TileFn = void (*)(const TileArgs&);

template <WKind KW, int R, int TT>
struct ScalarImpl {
  static constexpr TileFn fn = &tile_scalar<KW, R, TT>;
};
#if PARALLM_X86
template <WKind KW, int R, int TT>
struct Avx2Impl {
  static constexpr TileFn fn = &tile_avx2<KW, R, TT>;
};
template <WKind KW, int R, int TT>
struct Avx512Impl {
  static constexpr TileFn fn = &tile_avx512<KW, R, TT>;
};
#endif

// The tiles of one (level, dtype). Heights fit the register file: R*TT accumulators + TT x
// vectors + 1 weight vector in AVX2's 16 (AVX-512: 32) registers. `narrow_rows` divides
// `wide_rows`.
struct Tiles {
  int x_block;    // 0: x as given; B: x permuted in blocks of B (see permute_x)
  int wide_rows;  // height for 1-2 tokens
  TileFn wide[2];
  int narrow_rows;  // height for 3-4 tokens, and for every chunk when T > 2
  TileFn narrow[4];
  TileFn single[4];  // 1 row: the last rows of a thread's range
};

template <WKind KW, template <WKind, int, int> class Impl, int Ra, int Rb>
Tiles make_tiles(int x_block = 0) {
  return Tiles{x_block,
               Ra,
               {Impl<KW, Ra, 1>::fn, Impl<KW, Ra, 2>::fn},
               Rb,
               {Impl<KW, Rb, 1>::fn, Impl<KW, Rb, 2>::fn, Impl<KW, Rb, 3>::fn, Impl<KW, Rb, 4>::fn},
               {Impl<KW, 1, 1>::fn, Impl<KW, 1, 2>::fn, Impl<KW, 1, 3>::fn, Impl<KW, 1, 4>::fn}};
}

// Tile heights: 4 rows (4 streams per thread) measured best on Zen 3 for 1-2 tokens; AVX-512's
// 32 registers hold 4 x 4 accumulators for 3-4 tokens.
template <WKind KW>
Tiles tiles_for(SimdLevel level) {
#if PARALLM_X86
  if (level == SimdLevel::Avx512)
    return make_tiles<KW, Avx512Impl, 4, 4>(KW == WKind::BF16 ? 32 : 0);
  if (level == SimdLevel::Avx2) return make_tiles<KW, Avx2Impl, 4, 2>(KW == WKind::BF16 ? 16 : 0);
#endif
  return make_tiles<KW, ScalarImpl, 4, 2>();
}

const Tiles& select_tiles(WKind kind, SimdLevel level) {
  static const Tiles table[3][3] = {
      {tiles_for<WKind::F32>(SimdLevel::Scalar), tiles_for<WKind::F32>(SimdLevel::Avx2),
       tiles_for<WKind::F32>(SimdLevel::Avx512)},
      {tiles_for<WKind::BF16>(SimdLevel::Scalar), tiles_for<WKind::BF16>(SimdLevel::Avx2),
       tiles_for<WKind::BF16>(SimdLevel::Avx512)},
      {tiles_for<WKind::F16>(SimdLevel::Scalar), tiles_for<WKind::F16>(SimdLevel::Avx2),
       tiles_for<WKind::F16>(SimdLevel::Avx512)},
  };
  return table[static_cast<int>(kind)][static_cast<int>(level)];
}

WKind kind_of(DType t) {
  switch (t) {
    case DType::F32:
      return WKind::F32;
    case DType::BF16:
      return WKind::BF16;
    case DType::F16:
      return WKind::F16;
    default:
      break;
  }
  fail("matmul", "unsupported weight dtype ", dtype_name(t));
}

// x [T, K] laid out for tiles that take x_block-sized blocks of 16-bit weights as even and odd
// halves: in each full block of B elements, the B/2 even elements, then the B/2 odd ones; the tail
// after the last full block stays as it is. The copy lives in the calling thread's scratch and is
// read by all threads of the pool during the call. It is 64-byte aligned, so that each vector
// load of it reads one cache line (see core/aligned.h: 2x at 4 tokens on Zen 5).
const float* permute_x(const float* x, int64_t T, int64_t K, int B) {
  thread_local AlignedVector<float> buf;
  buf.resize(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    const float* src = x + t * K;
    float* dst = buf.data() + t * K;
    int64_t k = 0;
    for (; k + B <= K; k += B)
      for (int j = 0; j < B / 2; ++j) {
        dst[k + j] = src[k + 2 * j];
        dst[k + B / 2 + j] = src[k + 2 * j + 1];
      }
    for (; k < K; ++k) dst[k] = src[k];
  }
  return buf.data();
}

// Rows [n0, n1) of y for all T tokens, with the GEMV tiles.
void gemv_rows(const float* x, int64_t T, const void* w, WKind kind, int64_t K, int64_t N,
               int64_t n0, int64_t n1, float* y, bool accumulate, const Tiles& tiles) {
  const size_t esize = kind == WKind::F32 ? 4 : 2;
  const char* wb = static_cast<const char*>(w);
  const bool wide = T <= 2;
  const int64_t R = wide ? tiles.wide_rows : tiles.narrow_rows;
  const TileFn* group = wide ? tiles.wide : tiles.narrow;
  // The R rows of a tile are R streams: the range is cut into R equal parts and tile i takes row i
  // of each part, so each stream walks a long contiguous stretch of W (rows of W are contiguous)
  // instead of one 4-8 KiB row. Long streams keep the hardware prefetchers trained across pages.
  const int64_t part = (n1 - n0) / R;
  auto run = [&](const TileFn* fns, int64_t row, int64_t row_step) {
    // Token chunks inner: this tile's rows come from memory once, later chunks hit L1/L2.
    static_assert(kGemvTokenChunk == 4, "one tile function per chunk width 1..4");
    for (int64_t t0 = 0; t0 < T; t0 += kGemvTokenChunk) {
      const int64_t tt = std::min<int64_t>(kGemvTokenChunk, T - t0);
      TileArgs a{x + t0 * K,
                 K,
                 wb + static_cast<size_t>(row * K) * esize,
                 K,
                 row_step * K,
                 y + t0 * N + row,
                 N,
                 row_step,
                 accumulate};
      fns[tt - 1](a);
    }
  };
  for (int64_t i = 0; i < part; ++i) run(group, n0 + i, part);
  for (int64_t n = n0 + R * part; n < n1; ++n) run(tiles.single, n, 1);
}

// ---- sgemm path

void init_openblas_threads() {
  // Our pool owns the parallelism; OpenBLAS's own threads would oversubscribe the cores (several
  // ranks can run as threads in one process, each with its own pool).
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

#if PARALLM_X86
template <WKind KW>
PARALLM_AVX2 void widen_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, wload8<KW>(src, i));
  for (; i < n; ++i) dst[i] = scalar_weight(src, KW, i);
}
template <WKind KW>
PARALLM_AVX512 void widen_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, wload16<KW>(src, i));
  for (; i < n; ++i) dst[i] = scalar_weight(src, KW, i);
}
#endif

void widen(const uint16_t* src, WKind kind, float* dst, int64_t n, SimdLevel level) {
#if PARALLM_X86
  if (level == SimdLevel::Avx512) {
    kind == WKind::BF16 ? widen_avx512<WKind::BF16>(src, dst, n)
                        : widen_avx512<WKind::F16>(src, dst, n);
    return;
  }
  if (level == SimdLevel::Avx2) {
    kind == WKind::BF16 ? widen_avx2<WKind::BF16>(src, dst, n)
                        : widen_avx2<WKind::F16>(src, dst, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = scalar_weight(src, kind, i);
}

// Per-thread scratch for widened weights, grown on demand and kept for the thread's lifetime;
// 64-byte aligned (core/aligned.h).
float* widen_scratch(int64_t floats) {
  thread_local AlignedVector<float> buf;
  if (floats > static_cast<int64_t>(buf.size())) buf = AlignedVector<float>(static_cast<size_t>(floats));
  return buf.data();
}

void sgemm_rows(const float* x, int64_t T, const void* w, WKind kind, int64_t K, int64_t N,
                int64_t n0, int64_t n1, float* y, bool accumulate, SimdLevel level) {
  const float beta = accumulate ? 1.0f : 0.0f;
  if (kind == WKind::F32) {
    // y[:, n0:n1] = x [T, K] . W[n0:n1]^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T),
                static_cast<int>(n1 - n0), static_cast<int>(K), 1.0f, x, static_cast<int>(K),
                static_cast<const float*>(w) + n0 * K, static_cast<int>(K), beta, y + n0,
                static_cast<int>(N));
    return;
  }
  const int64_t block = std::clamp<int64_t>(kWidenBlockBytes / (K * 4) / kRowUnit * kRowUnit,
                                            kRowUnit, kWidenBlockMaxRows);
  float* scratch = widen_scratch(std::min(block, n1 - n0) * K);
  const uint16_t* w16 = static_cast<const uint16_t*>(w);
  for (int64_t b = n0; b < n1; b += block) {
    const int64_t rows = std::min(block, n1 - b);
    widen(w16 + b * K, kind, scratch, rows * K, level);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T),
                static_cast<int>(rows), static_cast<int>(K), 1.0f, x, static_cast<int>(K), scratch,
                static_cast<int>(K), beta, y + b, static_cast<int>(N));
  }
}

// ---- bf16 weights from kSgemmMinT tokens on CPUs with AVX512_BF16 (Zen 4 and later, Cooper
// Lake, Sapphire Rapids): vdpbf16ps multiplies 32 bf16 pairs into 16 f32 sums in one instruction,
// twice sgemm's multiplies per instruction and no widening of W. The activations are rounded to
// bf16 once per call (round to nearest even, as llama.cpp does for bf16 weights; the products and
// sums stay f32). Each thread packs 32 rows of W at a time (a panel) as [K/2 column pairs][32
// rows][2], so one 64-byte load holds 16 rows' next pair of weights, and a tile of 32 rows x 8
// tokens (16 accumulators) feeds each weight load to 8 vdpbf16ps and each broadcast pair of x to 2.
#if PARALLM_X86
#define PARALLM_AVX512BF16 __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma")))

constexpr int kBf16PanelRows = 32;

// x [T, K] f32 -> bf16 (round to nearest even), n = T * K values.
PARALLM_AVX512BF16 void round_to_bf16(const float* x, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, reinterpret_cast<const __m512i&>(v));
  }
  for (; i < n; ++i) out[i] = f32_to_bf16(x[i]);
}

// Rows [0, nr) of w (row stride K, K even) into the panel; rows nr..31 are zeros.
void pack_bf16_panel(const uint16_t* w, int nr, int64_t K, uint32_t* panel) {
  const int64_t pairs = K / 2;
  for (int r = 0; r < kBf16PanelRows; ++r) {
    if (r >= nr) {
      for (int64_t p = 0; p < pairs; ++p) panel[p * kBf16PanelRows + r] = 0;
      continue;
    }
    const uint16_t* row = w + r * K;
    for (int64_t p = 0; p < pairs; ++p) {
      uint32_t v;
      std::memcpy(&v, row + 2 * p, 4);
      panel[p * kBf16PanelRows + r] = v;
    }
  }
}

// TT tokens of xb (bf16, row stride K) x the panel's 32 rows; rows [0, nr) to y[t * ldy + r].
template <int TT>
PARALLM_AVX512BF16 void bf16_gemm_tile(const uint32_t* panel, int64_t K, const uint16_t* xb,
                                       float* y, int64_t ldy, int nr, bool accumulate) {
  __m512 acc[TT][2];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512 w0 = _mm512_castsi512_ps(_mm512_load_si512(panel + p * kBf16PanelRows));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_load_si512(panel + p * kBf16PanelRows + 16));
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      uint32_t v;
      std::memcpy(&v, xb + t * K + 2 * p, 4);
      const __m512 xv = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(v)));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], reinterpret_cast<const __m512bh&>(w0),
                                   reinterpret_cast<const __m512bh&>(xv));
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], reinterpret_cast<const __m512bh&>(w1),
                                   reinterpret_cast<const __m512bh&>(xv));
    }
  }
  simd::store_rows32<TT>(acc, y, ldy, nr, accumulate);
}

bool bf16_gemm_runs(DType type, int64_t T, int64_t K) {
  return type == DType::BF16 && T >= kSgemmMinT && K % 2 == 0 && bf16_gemm_available();
}

// y [T, N] (+)= x W^T, W's 32-row panels packed by fill(n0, nr, panel) on the pool's threads.
template <class Fill>
void bf16_gemm_panels(const float* x, int64_t T, int64_t K, int64_t N, float* y, bool accumulate,
                      const Fill& fill) {
  thread_local std::vector<uint16_t> xb_buf;
  xb_buf.resize(static_cast<size_t>(T * K));
  round_to_bf16(x, xb_buf.data(), T * K);
  const uint16_t* xb = xb_buf.data();  // the pool's threads read the caller's buffer
  const int64_t panels = (N + kBf16PanelRows - 1) / kBf16PanelRows;
  ThreadPool::current().parallel_for(panels, [&](int64_t p0, int64_t p1) {
    uint32_t* panel =
        reinterpret_cast<uint32_t*>(widen_scratch(K / 2 * kBf16PanelRows));  // 64-byte aligned
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t n0 = pi * kBf16PanelRows;
      const int nr = static_cast<int>(std::min<int64_t>(kBf16PanelRows, N - n0));
      fill(n0, nr, panel);
      int64_t t = 0;
      for (; t + 8 <= T; t += 8)
        bf16_gemm_tile<8>(panel, K, xb + t * K, y + t * N + n0, N, nr, accumulate);
      for (; t < T; ++t) bf16_gemm_tile<1>(panel, K, xb + t * K, y + t * N + n0, N, nr, accumulate);
    }
  });
}

void bf16_gemm(const float* x, int64_t T, const uint16_t* w, int64_t K, int64_t N, float* y,
               bool accumulate) {
  bf16_gemm_panels(x, T, K, N, y, accumulate, [&](int64_t n0, int nr, uint32_t* panel) {
    pack_bf16_panel(w + n0 * K, nr, K, panel);
  });
}
#endif  // PARALLM_X86

void check_args(const char* fn, const float* x, int64_t T, const Tensor& w, const float* y) {
  if (!w.defined() || w.ndim() != 2 || !w.is_contiguous())
    fail("matmul", fn, ": weight must be a contiguous 2-D [N, K] tensor, got ",
         w.defined() ? w.describe() : std::string("an undefined tensor"));
  if (T < 0) fail("matmul", fn, ": T must be >= 0, got ", T);
  if (T > 0 && w.numel() > 0 && (x == nullptr || y == nullptr))
    fail("matmul", fn, ": null x or y with T=", T, " and weight ", w.describe());
  if (w.dim(0) > INT32_MAX || w.dim(1) > INT32_MAX || T > INT32_MAX)
    fail("matmul", fn, ": dimensions beyond 2^31 are not supported, weight ", w.describe(),
         " T=", T);
}

}  // namespace

void matmul(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate) {
  check_args("matmul", x, T, w, y);
  if (is_block(w.dtype())) return quant_matmul(x, T, w, y, accumulate);
  const int64_t N = w.dim(0), K = w.dim(1);
  if (T == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) std::fill(y, y + T * N, 0.0f);
    return;
  }
  const WKind kind = kind_of(w.dtype());
  const SimdLevel level = simd_level();
  ThreadPool& pool = ThreadPool::current();
  const int64_t units = (N + kRowUnit - 1) / kRowUnit;
  if (T < kSgemmMinT) {
    const Tiles& tiles = select_tiles(kind, level);
    const float* xg = tiles.x_block ? permute_x(x, T, K, tiles.x_block) : x;
    pool.parallel_for(units, [&](int64_t u0, int64_t u1) {
      gemv_rows(xg, T, w.raw(), kind, K, N, u0 * kRowUnit, std::min(N, u1 * kRowUnit), y,
                accumulate, tiles);
    });
    return;
  }
#if PARALLM_X86
  if (bf16_gemm_runs(w.dtype(), T, K))
    return bf16_gemm(x, T, static_cast<const uint16_t*>(w.raw()), K, N, y, accumulate);
#endif
  init_openblas_threads();
  if (N < kSgemmMinRowsPerThread * pool.size() && T >= 16 * pool.size()) {
    // Few rows of W (e.g. the K/V projections): split the tokens instead; each thread widens all
    // of W (it is small) and computes its own rows of y.
    pool.parallel_for(T, [&](int64_t t0, int64_t t1) {
      sgemm_rows(x + t0 * K, t1 - t0, w.raw(), kind, K, N, 0, N, y + t0 * N, accumulate, level);
    });
    return;
  }
  pool.parallel_for(units, [&](int64_t u0, int64_t u1) {
    sgemm_rows(x, T, w.raw(), kind, K, N, u0 * kRowUnit, std::min(N, u1 * kRowUnit), y, accumulate,
               level);
  });
}

bool bf16_gemm_available() {
  // simd_level() is capped at what the CPU and the OS support, so Avx512 here means usable zmm.
  return simd_level() == SimdLevel::Avx512 && cpu_has_avx512bf16();
}

void bf16_gemm_f32_rows(const float* x, int64_t T, int64_t K, int64_t N, float* y,
                        bool accumulate, const std::function<void(int64_t, int, float*)>& rows) {
  if (!bf16_gemm_available() || K % 2 != 0)
    fail("matmul", "bf16_gemm_f32_rows: needs AVX512_BF16 and an even K, got K = ", K);
#if PARALLM_X86
  bf16_gemm_panels(x, T, K, N, y, accumulate, [&](int64_t n0, int nr, uint32_t* panel) {
    thread_local std::vector<float> f;
    thread_local std::vector<uint16_t> b;
    f.resize(static_cast<size_t>(nr * K));
    b.resize(f.size());
    rows(n0, nr, f.data());
    round_to_bf16(f.data(), b.data(), nr * K);
    pack_bf16_panel(b.data(), nr, K, panel);
  });
#else
  (void)x, (void)T, (void)N, (void)y, (void)accumulate, (void)rows;
#endif
}

std::string matmul_kernel(DType type, int64_t T, int64_t K) {
  if (is_block(type)) return quant_matmul_kernel(type, T, quant_path());
  if (T < kSgemmMinT) return "gemv";
#if PARALLM_X86
  if (bf16_gemm_runs(type, T, K)) return "bf16-gemm-avx512";
#endif
  return "sgemm";
}

void matmul_ref(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate) {
  check_args("matmul_ref", x, T, w, y);
  if (is_block(w.dtype())) {  // the f32 product on the dequantized weights
    const Tensor wf = w.to(DType::F32);
    return matmul_ref(x, T, wf, y, accumulate);
  }
  const int64_t N = w.dim(0), K = w.dim(1);
  const WKind kind = kind_of(w.dtype());
  // y[t, n] = sum_k x[t, k] * W[n, k], summed in double so the reference is the more exact side.
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += static_cast<double>(x[t * K + k]) * scalar_weight(w.raw(), kind, n * K + k);
      y[t * N + n] = static_cast<float>(accumulate ? y[t * N + n] + s : s);
    }
  }
}

}  // namespace parallm::kernels
