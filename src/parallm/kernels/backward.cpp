// The backward passes of the LLaMA building blocks (see backward.h).
//
// Matrix products (linear layers, attention scores and their gradients) go through OpenBLAS
// sgemm, single-threaded inside OpenBLAS: the rank's ThreadPool owns the parallelism (several
// ranks can run as threads of one process, each with its own pool), as in kernels/matmul.cpp.
// Linear layers split one product over the pool as a grid of blocks; attention runs one task per
// (sequence, head) with single-threaded sgemm calls inside, on blocks of query rows so most of
// the masked upper triangle is never computed. Row-wise ops split rows over the pool once there is
// enough work to pay for waking the threads. Sums that decide 1e-5 agreement with PyTorch (the
// RMSNorm mean, the softmax sums, the weight gradients of RMSNorm) are taken in double.
#include "parallm/kernels/backward.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/simd.h"

namespace parallm::kernels {
namespace {

constexpr const char* kWho = "kernels.backward";

// Below this many elements a row-wise op runs on the calling thread alone.
constexpr int64_t kParallelMin = int64_t{1} << 15;
// Below this many multiply-adds one sgemm runs on the calling thread alone.
constexpr int64_t kGemmParallelMin = int64_t{1} << 18;
// Attention works on blocks of this many query rows, so the causal triangle's upper half is
// mostly skipped (block i only needs the keys up to its last row).
constexpr int64_t kAttnBlock = 64;

void init_openblas_threads() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

template <class Fn>
void for_rows(int64_t rows, int64_t row_size, Fn&& fn) {
  if (rows > 1 && rows * row_size >= kParallelMin && ThreadPool::current().size() > 1) {
    ThreadPool::current().parallel_for(rows, fn);
  } else if (rows > 0) {
    fn(int64_t{0}, rows);
  }
}

// Columns [c0, c1) of a [T, D] reduction over rows, split over the pool in blocks of 16 columns
// (each thread owns its columns, so sums over rows need no merging) once there is enough work.
template <class Fn>
void for_cols(int64_t T, int64_t D, Fn&& cols) {
  if (T * D >= kParallelMin && D >= 64 && ThreadPool::current().size() > 1) {
    const int64_t units = (D + 15) / 16;
    ThreadPool::current().parallel_for(
        units, [&](int64_t u0, int64_t u1) { cols(u0 * 16, std::min(D, u1 * 16)); });
  } else {
    cols(0, D);
  }
}

void check_dim(const char* fn, const char* name, int64_t v) {
  if (v < 0) fail(kWho, fn, ": ", name, " must be >= 0, got ", v);
  if (v > std::numeric_limits<int>::max())
    fail(kWho, fn, ": ", name, " = ", v, " is beyond 2^31, which BLAS cannot take");
}

// C [M, N] = alpha * op(A) [M, K] . op(B) [K, N] + beta * C, row-major, on the calling thread.
void sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    // BLAS may skip C entirely when K is 0; the contract is C = beta * C.
    if (beta != 1.0f)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n)
          C[m * ldc + n] = beta == 0.0f ? 0.0f : beta * C[m * ldc + n];
    return;
  }
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A,
              static_cast<int>(lda), B, static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}

// The same product split over the pool as a grid of blocks of C, one per thread: a parts along M
// times b along N with a * b = threads. Each thread's sgemm packs its own slices of op(A) and
// op(B), K * (M/a + N/b) floats, so the grid is the factor pair that makes that smallest (a 1-D
// split would have every thread pack all of the other operand).
void sgemm_pool(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  init_openblas_threads();
  ThreadPool& pool = ThreadPool::current();
  const int P = pool.size();
  if (P == 1 || M * N * K < kGemmParallelMin) {
    sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  constexpr int64_t unit = 16;  // rows or columns per unit of the split
  const int64_t mu = (M + unit - 1) / unit, nu = (N + unit - 1) / unit;
  int64_t ga = 1, gb = 1;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t a = 1; a <= P; ++a) {
    if (P % a != 0) continue;
    const int64_t b = P / a;
    const int64_t ma = (mu + a - 1) / a, nb = (nu + b - 1) / b;  // units per block
    // Blocks beyond the units idle their thread: count the busy ones.
    const double busy = static_cast<double>(std::min(a, mu) * std::min(b, nu));
    const double cost = static_cast<double>(ma + nb) + 1e9 * (P - busy);
    if (cost < best) best = cost, ga = a, gb = b;
  }
  pool.parallel_for(ga * gb, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t ia = i / gb, ib = i % gb;
      const int64_t m0 = std::min(M, mu * ia / ga * unit),
                    m1 = std::min(M, mu * (ia + 1) / ga * unit);
      const int64_t n0 = std::min(N, nu * ib / gb * unit),
                    n1 = std::min(N, nu * (ib + 1) / gb * unit);
      if (m1 <= m0 || n1 <= n0) continue;
      // Row m of op(A) starts at A + m * lda (not transposed) or at column m (transposed); column
      // n of op(B) at B + n (not transposed) or at row n (transposed).
      const float* a = ta ? A + m0 : A + m0 * lda;
      const float* b = tb ? B + n0 * ldb : B + n0;
      sgemm(ta, tb, m1 - m0, n1 - n0, K, alpha, a, lda, b, ldb, beta, C + m0 * ldc + n0, ldc);
    }
  });
}

void check_linear(const char* fn, int64_t T, int64_t out, int64_t in) {
  check_dim(fn, "T", T);
  check_dim(fn, "out", out);
  check_dim(fn, "in", in);
}

// The RoPE angle exactly as kernels::rope takes it: the f32 product of position and inv_freq,
// its cosine and sine in double, rounded once.
inline void rope_angle(int32_t pos, float inv_freq, float* c, float* s) {
  const float angle = static_cast<float>(pos) * inv_freq;
  *c = static_cast<float>(std::cos(static_cast<double>(angle)));
  *s = static_cast<float>(std::sin(static_cast<double>(angle)));
}

void check_rope(const char* fn, int64_t T, int64_t heads, int64_t head_dim) {
  if (T < 0 || heads < 0) fail(kWho, fn, ": T and heads must be >= 0, got ", T, " and ", heads);
  if (head_dim <= 0 || head_dim % 2 != 0)
    fail(kWho, fn, ": head_dim must be even and > 0, got ", head_dim);
}

void check_attention(const char* fn, int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t hd) {
  check_dim(fn, "B", B);
  check_dim(fn, "S", S);
  if (hd <= 0) fail(kWho, fn, ": head_dim must be > 0, got ", hd);
  check_dim(fn, "head_dim", hd);
  if (Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0)
    fail(kWho, fn, ": query heads (", Hq, ") must be a positive multiple of KV heads (", Hkv, ")");
  check_dim(fn, "B*S*Hq*head_dim", B * S * Hq * hd);
  check_dim(fn, "S*S", S * S);
}

// Per-thread scratch, grown on demand.
float* scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(static_cast<size_t>(floats));
  return buf.data();
}

// ---- row helpers: the max, exp(x - m) with its sum, in AVX2 where the CPU has it. The exps
// dominate attention's softmax (S^2 per head) and the cross-entropy (R x vocab), so they are
// vectorised (kernels::simd::exp8: within 2 ulp of expf); sums of exps are taken in double.

float row_max_scalar(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// out[j] = exp(x[j] - m) (out may be x; null: not stored); returns the sum.
double exp_sum_scalar(const float* x, int64_t n, float m, float* out) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float e = std::exp(x[j] - m);
    if (out) out[j] = e;
    sum += e;
  }
  return sum;
}

#if PARALLM_X86
PARALLM_AVX2 float row_max_avx2(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= 8) {
    __m256 v = _mm256_loadu_ps(x);
    for (j = 8; j + 8 <= n; j += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (float l : lanes) m = std::max(m, l);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

PARALLM_AVX2 double exp_sum_avx2(const float* x, int64_t n, float m, float* out) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = kernels::simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
    if (out) _mm256_storeu_ps(out + j, e);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  return sum + exp_sum_scalar(x + j, n - j, m, out ? out + j : nullptr);
}

PARALLM_AVX2 void swiglu_backward_avx2(const float* gate, const float* up, const float* dh,
                                       int64_t n, float* dgate, float* dup) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 s = _mm256_div_ps(
        one, _mm256_add_ps(one, kernels::simd::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    const __m256 d = _mm256_loadu_ps(dh + i);
    _mm256_storeu_ps(dup + i, _mm256_mul_ps(d, _mm256_mul_ps(g, s)));
    // s (1 + g (1 - s))
    const __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(dgate + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(up + i)), ds));
  }
  for (; i < n; ++i) {
    const float g = gate[i];
    const float s = 1.0f / (1.0f + std::exp(-g));
    dup[i] = dh[i] * (g * s);
    dgate[i] = dh[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
  }
}

// d[j] = p[j] * (d[j] - sum_l d[l] p[l]) over one row of n (the softmax's backward).
PARALLM_AVX2 void softmax_backward_row_avx2(float* d, const float* p, int64_t n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 prod = _mm256_mul_ps(_mm256_loadu_ps(d + j), _mm256_loadu_ps(p + j));
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(prod)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(prod, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
  double dot = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (int64_t t = j; t < n; ++t) dot += static_cast<double>(d[t] * p[t]);
  const float fdot = static_cast<float>(dot);
  const __m256 vdot = _mm256_set1_ps(fdot);
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 dv = _mm256_sub_ps(_mm256_loadu_ps(d + j), vdot);
    _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), dv));
  }
  for (; j < n; ++j) d[j] = p[j] * (d[j] - fdot);
}
#endif

void softmax_backward_row(float* d, const float* p, int64_t n, bool avx2) {
#if PARALLM_X86
  if (avx2) {
    softmax_backward_row_avx2(d, p, n);
    return;
  }
#endif
  (void)avx2;
  double dot = 0;
  for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(d[j] * p[j]);
  const float fdot = static_cast<float>(dot);
  for (int64_t j = 0; j < n; ++j) d[j] = p[j] * (d[j] - fdot);
}

inline bool use_avx2() {
#if PARALLM_X86
  return kernels::simd_level() >= kernels::SimdLevel::Avx2;
#else
  return false;
#endif
}

float row_max(const float* x, int64_t n, bool avx2) {
#if PARALLM_X86
  if (avx2) return row_max_avx2(x, n);
#endif
  (void)avx2;
  return row_max_scalar(x, n);
}

double exp_sum(const float* x, int64_t n, float m, float* out, bool avx2) {
#if PARALLM_X86
  if (avx2) return exp_sum_avx2(x, n, m, out);
#endif
  (void)avx2;
  return exp_sum_scalar(x, n, m, out);
}

}  // namespace

// ---- linear

void linear_forward(const float* x, const float* w, int64_t T, int64_t out, int64_t in, float* y) {
  check_linear("linear_forward", T, out, in);
  // y [T, out] = x [T, in] . W^T
  sgemm_pool(false, true, T, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

void linear_backward_input(const float* dy, const float* w, int64_t T, int64_t out, int64_t in,
                           float* dx, bool accumulate) {
  check_linear("linear_backward_input", T, out, in);
  // dx [T, in] = dy [T, out] . W [out, in]
  sgemm_pool(false, false, T, in, out, 1.0f, dy, out, w, in, accumulate ? 1.0f : 0.0f, dx, in);
}

void linear_backward_weight(const float* dy, const float* x, int64_t T, int64_t out, int64_t in,
                            float* dw) {
  check_linear("linear_backward_weight", T, out, in);
  // dW [out, in] += dy^T [out, T] . x [T, in]; dy is stored [T, out].
  sgemm_pool(true, false, out, in, T, 1.0f, dy, out, x, in, 1.0f, dw, in);
}

// ---- embedding

void embedding_backward(const int32_t* ids, int64_t T, const float* dx, int64_t D,
                        int64_t row_begin, int64_t row_end, float* dtable) {
  if (T < 0 || D < 0 || row_end < row_begin)
    fail(kWho, "embedding_backward: bad sizes T=", T, " D=", D, " rows [", row_begin, ", ", row_end,
         ")");
  // Tokens may repeat an id, so rows are not independent: threads split the columns instead,
  // each walking all tokens over its own columns.
  auto cols = [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t id = ids[t];
      if (id < row_begin || id >= row_end) continue;
      float* dst = dtable + (id - row_begin) * D;
      const float* src = dx + t * D;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  };
  for_cols(T, D, cols);
}

// ---- RMSNorm

void rmsnorm_forward(const float* x, const float* w, int64_t T, int64_t D, float eps, float* y,
                     float* rstd) {
  if (D <= 0 || T < 0) fail(kWho, "rmsnorm_forward: need D > 0 and T >= 0, got D=", D, " T=", T);
  for_rows(T, D, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x + t * D;
      float* yr = y + t * D;
      double acc[4] = {0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 4 <= D; i += 4)
        for (int j = 0; j < 4; ++j) acc[j] += static_cast<double>(xr[i + j]) * xr[i + j];
      for (; i < D; ++i) acc[0] += static_cast<double>(xr[i]) * xr[i];
      const double ss = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
      rstd[t] = r;
      // PyTorch's order: (x * rstd) * w.
      for (int64_t k = 0; k < D; ++k) yr[k] = (xr[k] * r) * w[k];
    }
  });
}

void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, int64_t T,
                      int64_t D, float* dx, float* dw, bool accumulate) {
  if (D <= 0 || T < 0) fail(kWho, "rmsnorm_backward: need D > 0 and T >= 0, got D=", D, " T=", T);
  // y = x r w with r = (mean(x^2) + eps)^-1/2, dr/dx_j = -r^3 x_j / D:
  // dx_j = r (w_j dy_j) - x_j r^3 / D * sum_i w_i dy_i x_i.
  const double invD = 1.0 / static_cast<double>(D);
  for_rows(T, D, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x + t * D;
      const float* gr = dy + t * D;
      float* dxr = dx + t * D;
      double acc[4] = {0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 4 <= D; i += 4)
        for (int j = 0; j < 4; ++j) acc[j] += static_cast<double>(gr[i + j] * w[i + j]) * xr[i + j];
      for (; i < D; ++i) acc[0] += static_cast<double>(gr[i] * w[i]) * xr[i];
      const double dot = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      const float r = rstd[t];
      const float c = static_cast<float>(dot * invD * r * r * r);
      if (accumulate) {
        for (int64_t k = 0; k < D; ++k) dxr[k] += r * (gr[k] * w[k]) - c * xr[k];
      } else {
        for (int64_t k = 0; k < D; ++k) dxr[k] = r * (gr[k] * w[k]) - c * xr[k];
      }
    }
  });
  // dw_j += sum_t dy_tj x_tj r_t: threads split the columns, summing their tokens in double.
  auto cols = [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(static_cast<size_t>(c1 - c0), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const float* xr = x + t * D;
      const float* gr = dy + t * D;
      const float r = rstd[t];
      for (int64_t k = c0; k < c1; ++k) acc[k - c0] += static_cast<double>(gr[k] * (xr[k] * r));
    }
    for (int64_t k = c0; k < c1; ++k) dw[k] = static_cast<float>(dw[k] + acc[k - c0]);
  };
  for_cols(T, D, cols);
}

void rmsnorm_backward_ref(const float* x, const float* w, float eps, const float* dy, int64_t T,
                          int64_t D, float* dx, float* dw, bool accumulate) {
  if (D <= 0 || T < 0)
    fail(kWho, "rmsnorm_backward_ref: need D > 0 and T >= 0, got D=", D, " T=", T);
  std::vector<double> dwacc(static_cast<size_t>(D), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[t * D + i]) * x[t * D + i];
    const double r = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    double dot = 0;  // sum_i w_i dy_i x_i
    for (int64_t i = 0; i < D; ++i) dot += static_cast<double>(w[i]) * dy[t * D + i] * x[t * D + i];
    for (int64_t j = 0; j < D; ++j) {
      const double g = r * w[j] * dy[t * D + j] - x[t * D + j] * r * r * r * dot / D;
      dx[t * D + j] = static_cast<float>(accumulate ? dx[t * D + j] + g : g);
      dwacc[j] += static_cast<double>(dy[t * D + j]) * x[t * D + j] * r;
    }
  }
  for (int64_t j = 0; j < D; ++j) dw[j] = static_cast<float>(dw[j] + dwacc[j]);
}

// ---- RoPE backward: the forward is y = R(theta) x per pair, so dx = R(theta)^T dy = R(-theta) dy.

void rope_backward(float* dx, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
                   const float* inv_freq, kernels::RopeStyle style) {
  check_rope("rope_backward", T, heads, head_dim);
  kernels::rope_inverse(dx, T, heads, head_dim, positions, inv_freq, style);
}

void rope_backward_ref(float* dx, int64_t T, int64_t heads, int64_t head_dim,
                       const int32_t* positions, const float* inv_freq, kernels::RopeStyle style) {
  check_rope("rope_backward_ref", T, heads, head_dim);
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float* v = dx + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        float c, s;
        rope_angle(positions[t], inv_freq[i], &c, &s);
        const int64_t ia = style == kernels::RopeStyle::Interleaved ? 2 * i : i;
        const int64_t ib = style == kernels::RopeStyle::Interleaved ? 2 * i + 1 : i + half;
        const float a = v[ia], b = v[ib];
        // The transpose of [[c, -s], [s, c]].
        v[ia] = a * c + b * s;
        v[ib] = -a * s + b * c;
      }
    }
  }
}

// ---- attention

namespace {

// Rows [r0, r1) of one head's causal softmax: P_rows [r1 - r0, S] (row i at P_rows + (i - r0) *
// S) = softmax over j <= i of scale * q_i . k_j, zero above the diagonal. The forward keeps these
// rows in probs; the backward recomputes them here when probs were not kept, so both are the
// same calls on the same operands and agree bit for bit.
void softmax_rows(const float* qb, int64_t ldq, const float* kb, int64_t ldk, int64_t S,
                  int64_t hd, float scale, int64_t r0, int64_t r1, bool avx2, float* P_rows) {
  // Scores of rows [r0, r1) against keys [0, r1): the later keys are masked anyway.
  sgemm(false, true, r1 - r0, r1, hd, scale, qb + r0 * ldq, ldq, kb, ldk, 0.0f, P_rows, S);
  for (int64_t i = r0; i < r1; ++i) {
    float* row = P_rows + (i - r0) * S;
    const float m = row_max(row, i + 1, avx2);
    const double sum = exp_sum(row, i + 1, m, row, avx2);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
    std::fill(row + i + 1, row + S, 0.0f);
  }
}

}  // namespace

void attention_forward(const float* q, const float* k, const float* v, int64_t B, int64_t S,
                       int64_t Hq, int64_t Hkv, int64_t hd, float* out, float* probs) {
  check_attention("attention_forward", B, S, Hq, Hkv, hd);
  if (B == 0 || S == 0) return;
  init_openblas_threads();
  const int64_t group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool avx2 = use_avx2();
  auto task = [&](int64_t i0, int64_t i1) {
    // Without probs, each block's rows live in this thread's scratch only.
    float* block = probs == nullptr ? scratch(std::min(S, kAttnBlock) * S) : nullptr;
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq, g = h / group;
      const float* qb = q + b * S * ldq + h * hd;
      const float* kb = k + b * S * ldk + g * hd;
      const float* vb = v + b * S * ldk + g * hd;
      float* ob = out + b * S * ldq + h * hd;
      for (int64_t r0 = 0; r0 < S; r0 += kAttnBlock) {
        const int64_t r1 = std::min(S, r0 + kAttnBlock), n = r1 - r0;
        float* P = probs != nullptr ? probs + bh * S * S + r0 * S : block;
        softmax_rows(qb, ldq, kb, ldk, S, hd, scale, r0, r1, avx2, P);
        sgemm(false, false, n, hd, r1, 1.0f, P, S, vb, ldk, 0.0f, ob + r0 * ldq, ldq);
      }
    }
  };
  ThreadPool& pool = ThreadPool::current();
  if (pool.size() > 1 && B * Hq > 1 && B * Hq * S * S * hd >= kParallelMin) {
    pool.parallel_for_dynamic(B * Hq, 1, task);
  } else {
    task(0, B * Hq);
  }
}

void attention_backward(const float* q, const float* k, const float* v, const float* probs,
                        const float* dout, int64_t B, int64_t S, int64_t Hq, int64_t Hkv,
                        int64_t hd, float* dq, float* dk, float* dv) {
  check_attention("attention_backward", B, S, Hq, Hkv, hd);
  if (B == 0 || S == 0) return;
  init_openblas_threads();
  const int64_t group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool avx2 = use_avx2();
  // Query head h of sequence b: writes its dq and adds its share to dkb / dvb ([S, hd], rows
  // ldkv apart), the gradients of its KV head.
  auto head = [&](int64_t b, int64_t h, float* dkb, float* dvb, int64_t ldkv) {
    // dS [block, S], then (probs not kept) the block's recomputed softmax rows [block, S].
    const int64_t blk = std::min(S, kAttnBlock) * S;
    float* dS = scratch(probs == nullptr ? 2 * blk : blk);
    float* recomputed = dS + blk;
    const int64_t g = h / group;
    const float* kb = k + b * S * ldk + g * hd;
    const float* vb = v + b * S * ldk + g * hd;
    const float* qb = q + b * S * ldq + h * hd;
    const float* dob = dout + b * S * ldq + h * hd;
    float* dqb = dq + b * S * ldq + h * hd;
    for (int64_t r0 = 0; r0 < S; r0 += kAttnBlock) {
      const int64_t r1 = std::min(S, r0 + kAttnBlock), n = r1 - r0;
      // P: rows [r0, r1) of the softmax, row i at P + (i - r0) * S.
      // (No offset on a null probs: that is undefined behaviour, and clang's UBSan reports it.)
      const float* P = probs != nullptr ? probs + (b * Hq + h) * S * S + r0 * S : nullptr;
      if (probs == nullptr) {
        softmax_rows(qb, ldq, kb, ldk, S, hd, scale, r0, r1, avx2, recomputed);
        P = recomputed;
      }
      // dP [n, r1] = dO [rows] . V[0, r1)^T
      sgemm(false, true, n, r1, hd, 1.0f, dob + r0 * ldq, ldq, vb, ldk, 0.0f, dS, r1);
      // dS = P * (dP - rowsum(dP * P)), the softmax's backward; zero above the diagonal.
      for (int64_t i = r0; i < r1; ++i) {
        float* d = dS + (i - r0) * r1;
        const float* p = P + (i - r0) * S;
        softmax_backward_row(d, p, i + 1, avx2);
        std::fill(d + i + 1, d + r1, 0.0f);
      }
      // dq [rows] = scale * dS . K[0, r1)
      sgemm(false, false, n, hd, r1, scale, dS, r1, kb, ldk, 0.0f, dqb + r0 * ldq, ldq);
      // dK[0, r1) += scale * dS^T . q [rows]
      sgemm(true, false, r1, hd, n, scale, dS, r1, qb + r0 * ldq, ldq, 1.0f, dkb, ldkv);
      // dV[0, r1) += P [rows, 0..r1)^T . dO [rows]
      sgemm(true, false, r1, hd, n, 1.0f, P, S, dob + r0 * ldq, ldq, 1.0f, dvb, ldkv);
    }
  };
  auto zero_rows = [&](float* p, int64_t ld) {
    for (int64_t s = 0; s < S; ++s) std::fill(p + s * ld, p + s * ld + hd, 0.0f);
  };
  ThreadPool& pool = ThreadPool::current();
  const bool parallel = pool.size() > 1 && B * Hq > 1 && B * Hq * S * S * hd >= kParallelMin;
  if (!parallel || B * Hkv >= pool.size() || group == 1) {
    // One task per (sequence, KV head): it owns that head's dk and dv and the dq of its group's
    // query heads, so no two tasks write the same element.
    auto task = [&](int64_t i0, int64_t i1) {
      for (int64_t bg = i0; bg < i1; ++bg) {
        const int64_t b = bg / Hkv, g = bg % Hkv;
        float* dkb = dk + b * S * ldk + g * hd;
        float* dvb = dv + b * S * ldk + g * hd;
        zero_rows(dkb, ldk);
        zero_rows(dvb, ldk);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) head(b, h, dkb, dvb, ldk);
      }
    };
    if (parallel) {
      pool.parallel_for_dynamic(B * Hkv, 1, task);
    } else {
      task(0, B * Hkv);
    }
    return;
  }
  // Fewer (sequence, KV head) pairs than threads (e.g. one sequence per micro-batch): one task per
  // query head, each with its own dk and dv partials, summed over the group afterwards.
  std::vector<float> part(static_cast<size_t>(2 * B * Hq * S * hd));
  pool.parallel_for_dynamic(B * Hq, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t bh = i0; bh < i1; ++bh) {
      float* pk = part.data() + bh * S * hd;
      float* pv = pk + B * Hq * S * hd;
      std::fill(pk, pk + S * hd, 0.0f);
      std::fill(pv, pv + S * hd, 0.0f);
      head(bh / Hq, bh % Hq, pk, pv, hd);
    }
  });
  pool.parallel_for(B * S, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / S, s = t % S;
      for (int64_t g = 0; g < Hkv; ++g) {
        float* dkr = dk + t * ldk + g * hd;
        float* dvr = dv + t * ldk + g * hd;
        std::fill(dkr, dkr + hd, 0.0f);
        std::fill(dvr, dvr + hd, 0.0f);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const float* pk = part.data() + ((b * Hq + h) * S + s) * hd;
          const float* pv = pk + B * Hq * S * hd;
          for (int64_t c = 0; c < hd; ++c) {
            dkr[c] += pk[c];
            dvr[c] += pv[c];
          }
        }
      }
    }
  });
}

void attention_backward_ref(const float* q, const float* k, const float* v, const float* dout,
                            int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t hd, float* dq,
                            float* dk, float* dv) {
  check_attention("attention_backward_ref", B, S, Hq, Hkv, hd);
  const int64_t group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> dkacc(static_cast<size_t>(B * S * ldk), 0.0);
  std::vector<double> dvacc(dkacc.size(), 0.0);
  std::vector<double> p(static_cast<size_t>(S)), dp(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / group;
      auto Q = [&](int64_t i, int64_t c) { return double{q[(b * S + i) * ldq + h * hd + c]}; };
      auto K = [&](int64_t j, int64_t c) { return double{k[(b * S + j) * ldk + g * hd + c]}; };
      auto V = [&](int64_t j, int64_t c) { return double{v[(b * S + j) * ldk + g * hd + c]}; };
      auto dO = [&](int64_t i, int64_t c) { return double{dout[(b * S + i) * ldq + h * hd + c]}; };
      for (int64_t i = 0; i < S; ++i) {
        // p = softmax over j <= i of scale * q_i . k_j
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t c = 0; c < hd; ++c) s += Q(i, c) * K(j, c);
          p[j] = s * scale;
          m = std::max(m, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - m));
        for (int64_t j = 0; j <= i; ++j) p[j] /= sum;
        // dp_j = dO_i . v_j; ds_j = p_j (dp_j - sum_l p_l dp_l)
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t c = 0; c < hd; ++c) s += dO(i, c) * V(j, c);
          dp[j] = s;
          dot += p[j] * s;
        }
        for (int64_t c = 0; c < hd; ++c) {
          double s = 0;
          for (int64_t j = 0; j <= i; ++j) s += p[j] * (dp[j] - dot) * K(j, c);
          dq[(b * S + i) * ldq + h * hd + c] = static_cast<float>(s * scale);
        }
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = p[j] * (dp[j] - dot);
          for (int64_t c = 0; c < hd; ++c) {
            dkacc[(b * S + j) * ldk + g * hd + c] += ds * scale * Q(i, c);
            dvacc[(b * S + j) * ldk + g * hd + c] += p[j] * dO(i, c);
          }
        }
      }
    }
  }
  for (size_t i = 0; i < dkacc.size(); ++i) {
    dk[i] = static_cast<float>(dkacc[i]);
    dv[i] = static_cast<float>(dvacc[i]);
  }
}

// ---- SwiGLU: h = silu(g) u, silu(g) = g sigmoid(g), silu'(g) = s (1 + g (1 - s)).

void swiglu_backward(const float* gate, const float* up, const float* dh, int64_t n, float* dgate,
                     float* dup) {
  if (n < 0) fail(kWho, "swiglu_backward: n must be >= 0, got ", n);
  constexpr int64_t chunk = 4096;
  const int64_t chunks = (n + chunk - 1) / chunk;
  const bool avx2 = use_avx2();
  for_rows(chunks, chunk, [&](int64_t c0, int64_t c1) {
    const int64_t b = c0 * chunk, e = std::min(n, c1 * chunk);
#if PARALLM_X86
    if (avx2) {
      swiglu_backward_avx2(gate + b, up + b, dh + b, e - b, dgate + b, dup + b);
      return;
    }
#endif
    (void)avx2;
    for (int64_t i = b; i < e; ++i) {
      const float g = gate[i];
      const float s = 1.0f / (1.0f + std::exp(-g));
      const float d = dh[i];
      dup[i] = d * (g * s);
      dgate[i] = d * up[i] * (s * (1.0f + g * (1.0f - s)));
    }
  });
}

// ---- cross-entropy

float row_max(const float* x, int64_t n) { return row_max(x, n, use_avx2()); }

double exp_sum(const float* x, int64_t n, float m, float* out) {
  return exp_sum(x, n, m, out, use_avx2());
}

double cross_entropy_ref(const float* logits, int64_t R, int64_t V, const int32_t* targets,
                         float grad_scale, float* dlogits) {
  if (R < 0 || V <= 0) fail(kWho, "cross_entropy_ref: need R >= 0 and V > 0, got ", R, ", ", V);
  double loss = 0;
  for (int64_t r = 0; r < R; ++r) {
    const float* row = logits + r * V;
    if (targets[r] < 0 || targets[r] >= V)
      fail(kWho, "cross_entropy_ref: target ", targets[r], " of row ", r,
           " is outside the vocabulary [0, ", V, ")");
    double m = row[0];
    for (int64_t j = 1; j < V; ++j) m = std::max(m, double{row[j]});
    double sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(row[j] - m);
    loss += std::log(sum) + m - row[targets[r]];
    if (dlogits)
      for (int64_t j = 0; j < V; ++j)
        dlogits[r * V + j] = static_cast<float>(
            grad_scale * (std::exp(row[j] - m) / sum - (j == targets[r] ? 1.0 : 0.0)));
  }
  return loss;
}

}  // namespace parallm::kernels
