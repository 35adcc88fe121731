#include "parallm/kernels/vec.h"

#include <algorithm>
#include <cmath>

#include "parallm/kernels/simd.h"

namespace parallm::kernels::vec {
namespace {

#if PARALLM_X86
PARALLM_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8)
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = simd::hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

PARALLM_AVX2 void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

PARALLM_AVX2 void scale_avx2(float alpha, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] *= alpha;
}

PARALLM_AVX2 float softmax_avx2(float* x, int64_t n) {
  // max
  __m256 vm = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float m = _mm_cvtss_f32(m4);
  for (; i < n; ++i) m = std::max(m, x[i]);
  // exp(x - max) and its sum
  const __m256 vmax = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
    _mm256_storeu_ps(x + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  float s = simd::hsum8(vs);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}
#endif

}  // namespace

float dot(const float* a, const float* b, int64_t n, SimdLevel level) {
#if PARALLM_X86
  if (level >= SimdLevel::Avx2) return dot_avx2(a, b, n);
#endif
  float s[4] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void axpy(float alpha, const float* x, float* y, int64_t n, SimdLevel level) {
#if PARALLM_X86
  if (level >= SimdLevel::Avx2) return axpy_avx2(alpha, x, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void scale(float alpha, float* y, int64_t n, SimdLevel level) {
#if PARALLM_X86
  if (level >= SimdLevel::Avx2) return scale_avx2(alpha, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

float sum_squares(const float* x, int64_t n, SimdLevel level) {
  return dot(x, x, n, level);
}

void softmax(float* x, int64_t n, SimdLevel level) {
  float s;
#if PARALLM_X86
  if (level >= SimdLevel::Avx2) {
    s = softmax_avx2(x, n);
  } else
#endif
  {
    float m = x[0];
    for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
    s = 0;
    for (int64_t i = 0; i < n; ++i) {
      x[i] = std::exp(x[i] - m);
      s += x[i];
    }
  }
  scale(1.0f / s, x, n, level);
}

}  // namespace parallm::kernels::vec
