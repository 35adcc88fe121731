#include "parallm/kernels/matmul.h"

#include <gtest/gtest.h>

#include <thread>

#include "kernel_test_util.h"
#include "parallm/core/thread_pool.h"

namespace parallm::kernels {
namespace {

using testing::kU;

Tensor random_weight(DType dtype, int64_t N, int64_t K, uint32_t seed) {
  std::vector<float> v = testing::random_vec(static_cast<size_t>(N * K), seed);
  Tensor f = Tensor::empty(DType::F32, {N, K});
  std::copy(v.begin(), v.end(), f.data<float>());
  return f.to(dtype);
}

// Checks every element of the fast result against the reference with the classic bound for a sum
// of K products in f32 in any order (Higham: |error| <= gamma_K * sum |x_k w_k|, gamma_K ~ K u),
// plus one rounding for the accumulate add. The weights convert exactly to f32 on both sides, so
// the bound is the same for every dtype. Also reports the normalised error.
void expect_close(const std::vector<float>& x, int64_t T, const Tensor& w, const float* y0,
                  const std::vector<float>& fast, const std::vector<float>& ref,
                  const std::string& what) {
  const int64_t N = w.dim(0), K = w.dim(1);
  const Tensor wf = w.to(DType::F32);
  const float* W = wf.data<float>();
  const double gamma = (K + 2) * kU;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double abs_sum = y0 ? std::fabs(y0[t * N + n]) : 0.0;
      for (int64_t k = 0; k < K; ++k) abs_sum += std::fabs(x[t * K + k] * W[n * K + k]);
      const double err = std::fabs(static_cast<double>(fast[t * N + n]) - ref[t * N + n]);
      ASSERT_LE(err, gamma * abs_sum + 1e-30) << what << " t=" << t << " n=" << n;
    }
  }
  EXPECT_LT(testing::normalised_error(fast, ref), 1e-4) << what;
}

std::vector<float> bf16_rounded(std::vector<float> x) {
  for (float& v : x) v = bf16_to_f32(f32_to_bf16(v));
  return x;
}

struct Case {
  int64_t T, N, K;
};

void run_cases(const std::vector<Case>& cases, int threads) {
  ThreadPool pool(threads);
  ScopedPool scoped(pool);
  uint32_t seed = 1;
  for (SimdLevel level : testing::supported_levels()) {
    testing::ScopedSimd simd(level);
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      for (const Case& c : cases) {
        for (bool accumulate : {false, true}) {
          const std::string what = simd_name(level) + " " + std::string(dtype_name(dtype)) +
                                   " T=" + std::to_string(c.T) + " N=" + std::to_string(c.N) +
                                   " K=" + std::to_string(c.K) +
                                   " acc=" + std::to_string(accumulate) +
                                   " threads=" + std::to_string(threads);
          const Tensor w = random_weight(dtype, c.N, c.K, seed++);
          const std::vector<float> x = testing::random_vec(static_cast<size_t>(c.T * c.K), seed++);
          const std::vector<float> y0 = testing::random_vec(static_cast<size_t>(c.T * c.N), seed++);
          std::vector<float> fast = y0, ref = y0;
          matmul(x.data(), c.T, w, fast.data(), accumulate);
          // The AVX512_BF16 GEMM rounds x to bf16 first: the reference takes the same x.
          const std::vector<float> xr =
              matmul_kernel(dtype, c.T, c.K) == "bf16-gemm-avx512" ? bf16_rounded(x) : x;
          matmul_ref(xr.data(), c.T, w, ref.data(), accumulate);
          expect_close(xr, c.T, w, accumulate ? y0.data() : nullptr, fast, ref, what);
          if (::testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
}

// Odd shapes: K and N not multiples of 8/16/32, N = 1, K = 1; T covers the GEMV tiles (1..4),
// and chunked GEMV (5); the sgemm path has its own test below.
TEST(Matmul, GemvMatchesReferenceOnOddShapes) {
  run_cases({{1, 1, 1},
             {1, 1, 37},
             {1, 37, 1},
             {1, 19, 33},
             {1, 67, 129},
             {2, 21, 47},
             {3, 13, 71},
             {5, 17, 40},
             {1, 40, 16},
             {2, 8, 64},
             {4, 33, 100}},
            1);
}

TEST(Matmul, GemvMatchesReferenceWithThreads) {
  run_cases({{1, 67, 129}, {3, 35, 65}, {5, 50, 31}, {1, 3, 300}}, 3);
}

// T >= 64 goes to sgemm: split over rows of W when each thread gets >= 512 of them, else over
// tokens (the N = 1..300 cases here).
TEST(Matmul, SgemmPathMatchesReference) {
  run_cases({{64, 67, 129}, {64, 1, 17}, {70, 40, 1}, {64, 530, 33}}, 1);
  run_cases({{65, 1030, 20}, {80, 35, 300}}, 2);
}

// bf16 weights from 64 tokens on an AVX512_BF16 CPU: x rounded to bf16, then f32 sums (the cases
// above with an even K check it element by element at every level this CPU has).
TEST(Matmul, Bf16GemmOnAvx512Bf16RoundsOnlyX) {
  EXPECT_EQ(matmul_kernel(DType::BF16, 63, 300), "gemv");
  EXPECT_EQ(matmul_kernel(DType::F32, 64, 300), "sgemm");
  EXPECT_EQ(matmul_kernel(DType::BF16, 64, 301), "sgemm");  // odd K: no column pairs
  {
    testing::ScopedSimd simd(SimdLevel::Avx2);
    EXPECT_EQ(matmul_kernel(DType::BF16, 64, 300), "sgemm");
  }
  if (matmul_kernel(DType::BF16, 64, 300) != "bf16-gemm-avx512") {
    std::printf("[ skipped ] this CPU has no AVX512_BF16 (bf16 prefill runs sgemm)\n");
    return;
  }
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  constexpr int64_t T = 70, N = 77, K = 300;  // a tail of 6 tokens and a panel of 13 rows
  const Tensor w = random_weight(DType::BF16, N, K, 31);
  const std::vector<float> x = testing::random_vec(static_cast<size_t>(T * K), 32);
  const std::vector<float> xr = bf16_rounded(x);
  std::vector<float> fast(T * N, 2.0f), ref(T * N, 2.0f), exact(T * N, 2.0f);
  matmul(x.data(), T, w, fast.data(), true);
  matmul_ref(xr.data(), T, w, ref.data(), true);
  matmul_ref(x.data(), T, w, exact.data(), true);
  std::vector<float> y0(T * N, 2.0f);
  expect_close(xr, T, w, y0.data(), fast, ref, "bf16 gemm");
  // Against the unrounded x: bf16's rounding (2^-9 relative), averaged over K products.
  const double e = testing::normalised_error(fast, exact);
  EXPECT_GT(e, 1e-6);
  EXPECT_LT(e, 4e-3);
}

TEST(Matmul, EveryTokenCountMatchesReference) {
  // Each T crosses a different mix of tiles, token chunks and the GEMV/sgemm switch at 64.
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  const Tensor w = random_weight(DType::BF16, 29, 45, 7);
  for (int64_t T : {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 16, 33, 63, 64, 65}) {
    const std::vector<float> x = testing::random_vec(static_cast<size_t>(T * 45), 100 + T);
    std::vector<float> fast(T * 29), ref(T * 29);
    matmul(x.data(), T, w, fast.data());
    matmul_ref(x.data(), T, w, ref.data());
    expect_close(x, T, w, nullptr, fast, ref, "T=" + std::to_string(T));
  }
}

TEST(Matmul, ReferenceComputesXTimesWTransposed) {
  // x = [[1, 2]], W = [[1, 0], [0, 1], [3, -1]] -> y = [1, 2, 1]; then accumulate adds again.
  Tensor w = Tensor::empty(DType::F32, {3, 2});
  const float wv[] = {1, 0, 0, 1, 3, -1};
  std::copy(wv, wv + 6, w.data<float>());
  const float x[] = {1, 2};
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    float y[3] = {9, 9, 9};
    const Tensor wd = w.to(dtype);
    matmul(x, 1, wd, y);
    EXPECT_EQ(y[0], 1);
    EXPECT_EQ(y[1], 2);
    EXPECT_EQ(y[2], 1);
    matmul(x, 1, wd, y, /*accumulate=*/true);
    EXPECT_EQ(y[2], 2);
    float r[3];
    matmul_ref(x, 1, wd, r);
    EXPECT_EQ(r[2], 1);
  }
}

TEST(Matmul, ConcurrentCallersWithTheirOwnPools) {
  // Ranks run as threads, each with its own pool, calling matmul at the same time (both paths).
  const Tensor w = random_weight(DType::BF16, 70, 150, 3);
  const std::vector<float> x = testing::random_vec(64 * 150, 4);
  std::vector<float> ref(64 * 70);
  // The prefill reference: on the x the path multiplies (bf16-rounded for the AVX512_BF16 GEMM).
  const std::vector<float> xr =
      matmul_kernel(DType::BF16, 64, 150) == "bf16-gemm-avx512" ? bf16_rounded(x) : x;
  matmul_ref(xr.data(), 64, w, ref.data());
  std::vector<std::vector<float>> out(3, std::vector<float>(64 * 70));
  std::vector<std::thread> ranks;
  for (int r = 0; r < 3; ++r) {
    ranks.emplace_back([&, r] {
      ThreadPool pool(2);
      ScopedPool scoped(pool);
      for (int i = 0; i < 5; ++i) {
        matmul(x.data(), 64, w, out[r].data());      // sgemm (or bf16 GEMM) path
        matmul(x.data(), 1, w, out[r].data() + 70);  // GEMV path, token 1's row
      }
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_LT(testing::normalised_error(out[r].data(), ref.data(), 70), 1e-5);
    EXPECT_LT(testing::normalised_error(out[r].data() + 140, ref.data() + 140, 62 * 70), 1e-5);
    std::vector<float> ref0(70);
    matmul_ref(x.data(), 1, w, ref0.data());
    EXPECT_LT(testing::normalised_error(out[r].data() + 70, ref0.data(), 70), 1e-5);
  }
}

TEST(Matmul, RejectsBadWeights) {
  const float x[4] = {};
  float y[4];
  Tensor w3 = Tensor::zeros(DType::F32, {2, 2, 1});
  try {
    matmul(x, 1, w3, y);
    FAIL() << "3-D weight accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("[matmul]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("f32[2, 2, 1]"), std::string::npos) << e.what();
  }
  Tensor strided = Tensor::zeros(DType::BF16, {4, 4}).slice_cols(0, 2);
  EXPECT_THROW(matmul(x, 1, strided, y), std::invalid_argument);
  EXPECT_THROW(matmul_ref(x, 1, Tensor(), y), std::invalid_argument);
  EXPECT_THROW(matmul(x, -1, Tensor::zeros(DType::F32, {2, 2}), y), std::invalid_argument);
}

TEST(Matmul, EmptyInnerDimensionGivesZeros) {
  const Tensor w = Tensor::zeros(DType::BF16, {3, 0});
  float y[3] = {5, 5, 5};
  matmul(nullptr, 1, w, y, true);
  EXPECT_EQ(y[0], 5);
  matmul(nullptr, 1, w, y);
  EXPECT_EQ(y[1], 0);
}

}  // namespace
}  // namespace parallm::kernels
