// Helpers shared by the kernel tests: random data, the normalised error, and a loop over every SIMD
// level this CPU supports.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "parallm/kernels/cpu.h"

namespace parallm::kernels::testing {

// Unit roundoff of f32.
constexpr double kU = 1.0 / (1 << 24);

inline std::vector<float> random_vec(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// max |a - b| / max |b|: the error relative to the size of the reference output.
inline double normalised_error(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den == 0 ? num : num / den;
}
inline double normalised_error(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  return normalised_error(a.data(), b.data(), std::min(a.size(), b.size()));
}

// Every level up to what the CPU supports, e.g. {scalar, avx2}.
inline std::vector<SimdLevel> supported_levels() {
  std::vector<SimdLevel> out;
  for (int l = 0; l <= static_cast<int>(cpu_simd_level()); ++l)
    out.push_back(static_cast<SimdLevel>(l));
  return out;
}

// Sets the level for a scope and restores the previous one.
class ScopedSimd {
 public:
  explicit ScopedSimd(SimdLevel l) : previous_(simd_level()) { set_simd_level(l); }
  ~ScopedSimd() { set_simd_level(previous_); }

 private:
  SimdLevel previous_;
};

}  // namespace parallm::kernels::testing
