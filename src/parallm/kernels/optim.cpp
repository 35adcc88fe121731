#include "parallm/kernels/optim.h"

#include <cmath>

#include "parallm/kernels/cpu.h"
#include "parallm/kernels/simd.h"

namespace parallm::kernels {
namespace {

inline void adamw_one(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  const float gi = g * s.grad_scale;
  const float pi = p * s.decay;
  const float mi = std::fma(s.one_minus_beta1, gi, m * s.beta1);
  const float vi = std::fma(s.one_minus_beta2 * gi, gi, v * s.beta2);
  const float denom = std::sqrt(vi) / s.bias2_sqrt + s.eps;
  p = std::fma(-s.step_size, mi / denom, pi);
  m = mi;
  v = vi;
}

#if PARALLM_X86
// Memory-bound (7 floats moved per element); eight lanes keep the loads streaming.
PARALLM_AVX2 void adamw_avx2(float* p, const float* g, float* m, float* v, int64_t n,
                             const AdamWScalars& s) {
  const __m256 scale = _mm256_set1_ps(s.grad_scale), decay = _mm256_set1_ps(s.decay);
  const __m256 b1 = _mm256_set1_ps(s.beta1), omb1 = _mm256_set1_ps(s.one_minus_beta1);
  const __m256 b2 = _mm256_set1_ps(s.beta2), omb2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 bias2 = _mm256_set1_ps(s.bias2_sqrt), eps = _mm256_set1_ps(s.eps);
  const __m256 neg_step = _mm256_set1_ps(-s.step_size);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), scale);
    const __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), decay);
    const __m256 mi = _mm256_fmadd_ps(omb1, gi, _mm256_mul_ps(_mm256_loadu_ps(m + i), b1));
    const __m256 vi =
        _mm256_fmadd_ps(_mm256_mul_ps(omb2, gi), gi, _mm256_mul_ps(_mm256_loadu_ps(v + i), b2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bias2), eps);
    _mm256_storeu_ps(p + i, _mm256_fmadd_ps(neg_step, _mm256_div_ps(mi, denom), pi));
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
  }
  for (; i < n; ++i) adamw_one(p[i], g[i], m[i], v[i], s);
}
#endif

}  // namespace

void adamw_ref(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  for (int64_t i = 0; i < n; ++i) adamw_one(p[i], g[i], m[i], v[i], s);
}

void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
#if PARALLM_X86
  if (simd_level() >= SimdLevel::Avx2) return adamw_avx2(p, g, m, v, n, s);
#endif
  adamw_ref(p, g, m, v, n, s);
}

}  // namespace parallm::kernels
