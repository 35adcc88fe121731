#include "parallm/kernels/optim.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "kernel_test_util.h"

namespace parallm::kernels {
namespace {

AdamWScalars scalars(int64_t step, bool decay) {
  const double lr = 1e-3, wd = 0.1, b1 = 0.9, b2 = 0.95;
  AdamWScalars s;
  s.grad_scale = 0.75f;
  s.decay = static_cast<float>(decay ? 1.0 - lr * wd : 1.0);
  s.beta1 = static_cast<float>(b1);
  s.one_minus_beta1 = static_cast<float>(1.0 - b1);
  s.beta2 = static_cast<float>(b2);
  s.one_minus_beta2 = static_cast<float>(1.0 - b2);
  s.bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(b2, step)));
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(b1, step)));
  s.eps = 1e-8f;
  return s;
}

// The SIMD path gives the plain path's bits at every length (tails included), and both follow the
// formula within f32 rounding over several steps.
TEST(AdamW, SimdPathsGiveThePlainPathsBitsAndFollowTheFormula) {
  for (SimdLevel level : testing::supported_levels()) {
    testing::ScopedSimd simd(level);
    for (int64_t n : {1, 7, 8, 9, 100, 1031}) {
      auto p = testing::random_vec(n, 1, -1, 1), g = testing::random_vec(n, 2, -2, 2);
      std::vector<float> m(n, 0), v(n, 0);
      auto pr = p, mr = m, vr = v;
      std::vector<double> pd(p.begin(), p.end()), md(n, 0), vd(n, 0);
      for (int64_t step = 1; step <= 4; ++step) {
        const bool decay = step % 2 == 1;
        const AdamWScalars s = scalars(step, decay);
        adamw(p.data(), g.data(), m.data(), v.data(), n, s);
        adamw_ref(pr.data(), g.data(), mr.data(), vr.data(), n, s);
        for (int64_t i = 0; i < n; ++i) {
          const double gi = static_cast<double>(g[i]) * 0.75;
          pd[i] *= decay ? 1.0 - 1e-3 * 0.1 : 1.0;
          md[i] = 0.9 * md[i] + 0.1 * gi;
          vd[i] = 0.95 * vd[i] + 0.05 * gi * gi;
          const double denom = std::sqrt(vd[i]) / std::sqrt(1.0 - std::pow(0.95, step)) + 1e-8;
          pd[i] -= 1e-3 / (1.0 - std::pow(0.9, step)) * md[i] / denom;
        }
      }
      EXPECT_EQ(std::memcmp(p.data(), pr.data(), n * sizeof(float)), 0) << simd_name(level) << n;
      EXPECT_EQ(std::memcmp(m.data(), mr.data(), n * sizeof(float)), 0) << simd_name(level) << n;
      EXPECT_EQ(std::memcmp(v.data(), vr.data(), n * sizeof(float)), 0) << simd_name(level) << n;
      for (int64_t i = 0; i < n; ++i) {
        // Each step moves p by about lr; f32 rounding of p (~1e-7) dominates the difference.
        EXPECT_NEAR(p[i], pd[i], 1e-6) << i;
        EXPECT_NEAR(m[i], md[i], 1e-6 * std::abs(md[i]) + 1e-12) << i;
      }
    }
  }
}

}  // namespace
}  // namespace parallm::kernels
