// Row-wise and element-wise kernels. The fast versions use AVX2 where the CPU has it (AVX-512 adds
// nothing here: these are a small share of a token's time) and split rows over the pool once
// there is enough work to pay for waking the threads.
#include "parallm/kernels/ops.h"

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

// Below this many elements a kernel runs on the calling thread alone.
constexpr int64_t kParallelMin = int64_t{1} << 15;

// Runs fn(begin, end) over rows [0, rows), in parallel when rows * row_size is large enough.
template <class Fn>
void for_rows(int64_t rows, int64_t row_size, Fn&& fn) {
  if (rows > 1 && rows * row_size >= kParallelMin) {
    ThreadPool::current().parallel_for(rows, fn);
  } else if (rows > 0) {
    fn(int64_t{0}, rows);
  }
}

#if PARALLM_X86
PARALLM_AVX2 void rmsnorm_row_avx2(const float* x, const float* w, float* y, int64_t D, float inv) {
  const __m256 vi = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 xn = _mm256_mul_ps(_mm256_loadu_ps(x + i), vi);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(xn, _mm256_loadu_ps(w + i)));
  }
  for (; i < D; ++i) y[i] = (x[i] * inv) * w[i];
}

PARALLM_AVX2 void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}
#endif

void check_rope(int64_t head_dim, const char* fn) {
  if (head_dim <= 0 || head_dim % 2 != 0)
    fail("rope", fn, ": head_dim must be even and > 0, got ", head_dim);
}

// The angle exactly as PyTorch (f32 product of position and inv_freq) and llama2.c compute it;
// only its sine and cosine are taken in double, so they are correctly rounded.
inline void rope_angle(int32_t pos, float inv_freq, float* c, float* s) {
  const float angle = static_cast<float>(pos) * inv_freq;
  *c = static_cast<float>(std::cos(static_cast<double>(angle)));
  *s = static_cast<float>(std::sin(static_cast<double>(angle)));
}

}  // namespace

// ---- rmsnorm: y = x / sqrt(mean(x^2) + eps) * w, the product taken in PyTorch's order.

void rmsnorm(const float* x, const float* w, float* y, int64_t T, int64_t D, float eps) {
  if (D <= 0) fail("rmsnorm", "D must be > 0, got ", D);
  const SimdLevel level = simd_level();
  for_rows(T, D, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x + t * D;
      float* yr = y + t * D;
      const float ss = vec::sum_squares(xr, D, level);
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
#if PARALLM_X86
      if (level >= SimdLevel::Avx2) {
        rmsnorm_row_avx2(xr, w, yr, D, inv);
        continue;
      }
#endif
      for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] * inv) * w[i];
    }
  });
}

void rmsnorm_ref(const float* x, const float* w, float* y, int64_t T, int64_t D, float eps) {
  if (D <= 0) fail("rmsnorm", "D must be > 0, got ", D);
  // x, y: [T, D]; w: [D]
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[t * D + i]) * x[t * D + i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
    for (int64_t i = 0; i < D; ++i) y[t * D + i] = (x[t * D + i] * inv) * w[i];
  }
}

// ---- softmax

void softmax(float* x, int64_t n) {
  if (n <= 0) return;
  vec::softmax(x, n, simd_level());
}

void softmax_ref(float* x, int64_t n) {
  if (n <= 0) return;
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i]) - m);
  for (int64_t i = 0; i < n; ++i)
    x[i] = static_cast<float>(std::exp(static_cast<double>(x[i]) - m) / s);
}

// ---- SwiGLU: silu(g) = g * sigmoid(g) = g / (1 + e^-g)

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  const SimdLevel level = simd_level();
  constexpr int64_t kChunk = 4096;
  for_rows((n + kChunk - 1) / kChunk, kChunk, [&](int64_t c0, int64_t c1) {
    const int64_t b = c0 * kChunk, e = std::min(n, c1 * kChunk);
#if PARALLM_X86
    if (level >= SimdLevel::Avx2) {
      silu_mul_avx2(gate + b, up + b, out + b, e - b);
      return;
    }
#endif
    for (int64_t i = b; i < e; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  });
}

void silu_mul_ref(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i];
    out[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * up[i]);
  }
}

// ---- RoPE

namespace {

// Turns every pair by sign * positions[t] * inv_freq[i]: +1 is RoPE, -1 its inverse (the
// transpose of each rotation, which is also its backward). Negating the sine is exact, so the two
// directions round alike.
void rope_rotate(float* x, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
                 const float* inv_freq, RopeStyle style, float sign) {
  const int64_t half = head_dim / 2;
  for_rows(T, heads * head_dim, [&](int64_t t0, int64_t t1) {
    // cos/sin of one token, shared by all its heads.
    std::vector<float> cs(static_cast<size_t>(head_dim));
    float* c = cs.data();
    float* s = cs.data() + half;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        rope_angle(positions[t], inv_freq[i], &c[i], &s[i]);
        s[i] *= sign;
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + (t * heads + h) * head_dim;
        if (style == RopeStyle::Interleaved) {
          for (int64_t i = 0; i < half; ++i) {
            const float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * c[i] - b * s[i];
            v[2 * i + 1] = a * s[i] + b * c[i];
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = a * s[i] + b * c[i];
          }
        }
      }
    }
  });
}

}  // namespace

void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
          const float* inv_freq, RopeStyle style) {
  check_rope(head_dim, "rope");
  rope_rotate(x, T, heads, head_dim, positions, inv_freq, style, 1.0f);
}

void rope_inverse(float* x, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
                  const float* inv_freq, RopeStyle style) {
  check_rope(head_dim, "rope_inverse");
  rope_rotate(x, T, heads, head_dim, positions, inv_freq, style, -1.0f);
}

void rope_ref(float* x, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
              const float* inv_freq, RopeStyle style) {
  check_rope(head_dim, "rope_ref");
  // x: [T, heads, head_dim]; pair i of token t turns by positions[t] * inv_freq[i].
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        float c, s;
        rope_angle(positions[t], inv_freq[i], &c, &s);
        const int64_t ia = style == RopeStyle::Interleaved ? 2 * i : i;
        const int64_t ib = style == RopeStyle::Interleaved ? 2 * i + 1 : i + half;
        const float a = v[ia], b = v[ib];
        v[ia] = a * c - b * s;
        v[ib] = a * s + b * c;
      }
    }
  }
}

}  // namespace parallm::kernels
