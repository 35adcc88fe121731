#include "parallm/kernels/ops.h"

#include <gtest/gtest.h>

#include "kernel_test_util.h"
#include "parallm/core/thread_pool.h"

namespace parallm::kernels {
namespace {

using testing::kU;

TEST(RmsNorm, MatchesReference) {
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  for (SimdLevel level : testing::supported_levels()) {
    testing::ScopedSimd simd(level);
    // T = 64 x D = 1000 is large enough to be split over the pool.
    for (auto [T, D] :
         {std::pair<int64_t, int64_t>{1, 1}, {1, 7}, {3, 33}, {2, 2048}, {64, 1000}}) {
      const auto x = testing::random_vec(T * D, 1, -3, 3);
      const auto w = testing::random_vec(D, 2, 0.5, 1.5);
      std::vector<float> fast(T * D), ref(T * D);
      rmsnorm(x.data(), w.data(), fast.data(), T, D, 1e-5f);
      rmsnorm_ref(x.data(), w.data(), ref.data(), T, D, 1e-5f);
      // The f32 sum of D squares is off by at most ~D u (relative); the inverse square root halves
      // that, and the two products add 2 u.
      EXPECT_LT(testing::normalised_error(fast, ref), (D / 2.0 + 4) * kU)
          << simd_name(level) << " T=" << T << " D=" << D;
      // In place (x and y alias).
      std::vector<float> inplace = x;
      rmsnorm(inplace.data(), w.data(), inplace.data(), T, D, 1e-5f);
      EXPECT_EQ(inplace, fast);
    }
  }
}

TEST(RmsNorm, UnitRowsKeepTheirValues) {
  // A row of ones has rms 1: y = w (eps = 0).
  const std::vector<float> x(5, 1.0f), w = {1, 2, 3, 4, 5};
  std::vector<float> y(5);
  rmsnorm(x.data(), w.data(), y.data(), 1, 5, 0.0f);
  EXPECT_EQ(y, w);
  // [3, 4]: mean square 12.5 -> [3, 4] / sqrt(12.5)
  const float x2[] = {3, 4}, w2[] = {1, 1};
  float y2[2];
  rmsnorm_ref(x2, w2, y2, 1, 2, 0.0f);
  EXPECT_NEAR(y2[0], 0.8485281f, 1e-6);
  EXPECT_NEAR(y2[1], 1.1313708f, 1e-6);
  EXPECT_THROW(rmsnorm(x.data(), w.data(), y.data(), 1, 0, 0.0f), std::invalid_argument);
}

TEST(Softmax, MatchesReferenceAndSumsToOne) {
  for (SimdLevel level : testing::supported_levels()) {
    testing::ScopedSimd simd(level);
    for (int64_t n : {1, 2, 7, 8, 9, 31, 100, 1025}) {
      // Large offsets check the max subtraction: without it exp(200) overflows.
      auto fast = testing::random_vec(n, 3, 190, 210);
      auto ref = fast;
      softmax(fast.data(), n);
      softmax_ref(ref.data(), n);
      // exp8 is within 2 ulp; the f32 sum of n terms adds at most n u.
      EXPECT_LT(testing::normalised_error(fast, ref), (n + 8) * kU)
          << simd_name(level) << " n=" << n;
      double s = 0;
      for (float v : fast) s += v;
      EXPECT_NEAR(s, 1.0, (n + 8) * kU);
    }
  }
  float two[] = {0.0f, std::log(3.0f)};  // e^0 : e^ln3 = 1 : 3
  softmax(two, 2);
  EXPECT_NEAR(two[0], 0.25f, 1e-7);
  EXPECT_NEAR(two[1], 0.75f, 1e-7);
}

TEST(SiluMul, MatchesReference) {
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  for (SimdLevel level : testing::supported_levels()) {
    testing::ScopedSimd simd(level);
    for (int64_t n : {1, 7, 8, 19, 5632, 40000}) {
      const auto g = testing::random_vec(n, 4, -10, 10);
      const auto u = testing::random_vec(n, 5, -2, 2);
      std::vector<float> fast(n), ref(n);
      silu_mul(g.data(), u.data(), fast.data(), n);
      silu_mul_ref(g.data(), u.data(), ref.data(), n);
      // Per element: exp within 2 ulp, then a division and a product: 8 u is generous.
      for (int64_t i = 0; i < n; ++i)
        ASSERT_LE(std::fabs(fast[i] - ref[i]), 8 * kU * std::fabs(ref[i]) + 1e-30)
            << simd_name(level) << " i=" << i << " g=" << g[i];
      // In place over gate.
      std::vector<float> inplace = g;
      silu_mul(inplace.data(), u.data(), inplace.data(), n);
      EXPECT_EQ(inplace, fast);
    }
    // Saturation: huge |gate| gives silu ~ gate (positive) or ~0 (negative), never NaN or inf.
    const float g[] = {-100, -88, 88, 100, 0}, u[] = {1, 1, 1, 1, 1};
    float out[5];
    silu_mul(g, u, out, 5);
    EXPECT_NEAR(out[0], 0.0f, 1e-30);
    EXPECT_NEAR(out[1], 0.0f, 1e-30);
    EXPECT_EQ(out[2], 88.0f);
    EXPECT_EQ(out[3], 100.0f);
    EXPECT_EQ(out[4], 0.0f);
  }
}

// Hand-computed: x = [1, 2, 3, 4], inv_freq = [1, 0.5], position 1: pair 0 turns by 1 rad
// (cos 0.5403023, sin 0.8414710), pair 1 by 0.5 rad (cos 0.8775826, sin 0.4794255).
TEST(Rope, HandComputedBothStyles) {
  const float inv_freq[] = {1.0f, 0.5f};
  const int32_t pos[] = {1, 0};
  for (bool fast : {true, false}) {
    auto run = [&](RopeStyle style, float* x) {
      (fast ? rope : rope_ref)(x, 2, 1, 4, pos, inv_freq, style);
    };
    // Interleaved pairs (x0, x1) by 1 rad, (x2, x3) by 0.5 rad:
    // (1c - 2s, 1s + 2c) = (-1.1426397, 1.9220756); (3c - 4s, 3s + 4c) = (0.7150455, 4.9486070).
    float a[8] = {1, 2, 3, 4, 1, 2, 3, 4};
    run(RopeStyle::Interleaved, a);
    const float ea[] = {-1.1426397f, 1.9220756f, 0.7150455f, 4.9486070f};
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(a[i], ea[i], 2e-6) << i;
    for (int i = 0; i < 4; ++i) EXPECT_EQ(a[4 + i], i + 1) << "position 0 must not turn";
    // HalfSplit pairs (x0, x2) by 1 rad, (x1, x3) by 0.5 rad:
    // (1c - 3s, 1s + 3c) = (-1.9841107, 2.4623779); (2c - 4s, 2s + 4c) = (-0.1625370, 4.4691815).
    float b[8] = {1, 2, 3, 4, 1, 2, 3, 4};
    run(RopeStyle::HalfSplit, b);
    const float eb[] = {-1.9841107f, -0.1625370f, 2.4623779f, 4.4691815f};
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(b[i], eb[i], 2e-6) << i;
  }
}

TEST(Rope, MatchesReferenceAndKeepsNorms) {
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  const int64_t T = 37, heads = 5, D = 64;
  std::vector<float> inv_freq(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / D);
  std::vector<int32_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(1000 + 97 * t);
  for (RopeStyle style : {RopeStyle::Interleaved, RopeStyle::HalfSplit}) {
    const auto x = testing::random_vec(T * heads * D, 6);
    auto fast = x, ref = x;
    rope(fast.data(), T, heads, D, pos.data(), inv_freq.data(), style);
    rope_ref(ref.data(), T, heads, D, pos.data(), inv_freq.data(), style);
    // Same angles and the same two products per output: a few u at most.
    EXPECT_LT(testing::normalised_error(fast, ref), 4 * kU);
    // A rotation keeps each head's norm.
    double n0 = 0, n1 = 0;
    for (int64_t i = 0; i < D; ++i) {
      n0 += x[i] * x[i];
      n1 += fast[i] * fast[i];
    }
    EXPECT_NEAR(n0, n1, 1e-5 * n0);
  }
  EXPECT_THROW(rope(nullptr, 1, 1, 3, pos.data(), inv_freq.data(), RopeStyle::HalfSplit),
               std::invalid_argument);
}

}  // namespace
}  // namespace parallm::kernels
