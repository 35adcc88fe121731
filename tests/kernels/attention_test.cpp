#include "parallm/kernels/attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "kernel_test_util.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/vec.h"

namespace parallm::kernels {
namespace {

using testing::kU;

TEST(Attention, HandComputedOneHead) {
  // One head, head_dim 2, two tokens at positions 0 and 1 (prefill). k0 = [1, 0], k1 = [0, 1];
  // v0 = [1, 2], v1 = [3, 4]; q0 = q1 = [1, 0], scale 1.
  // Token 0 sees only position 0: out = v0. Token 1: scores [1, 0], softmax [e, 1] / (e + 1) =
  // [0.7310586, 0.2689414]: out = [0.7310586 + 3 * 0.2689414, 2 * 0.7310586 + 4 * 0.2689414].
  const float q[] = {1, 0, 1, 0};
  const float k[] = {1, 0, 0, 1};
  const float v[] = {1, 2, 3, 4};
  AttentionShape s{1, 1, 2, 2};
  for (bool fast : {true, false}) {
    float out[4];
    (fast ? attention : attention_ref)(q, k, v, out, 2, 0, s, 1.0f);
    EXPECT_NEAR(out[0], 1.0f, 1e-6);
    EXPECT_NEAR(out[1], 2.0f, 1e-6);
    EXPECT_NEAR(out[2], 1.5378828f, 1e-6);
    EXPECT_NEAR(out[3], 2.5378828f, 1e-6);
    // Decode of the second token alone (start_pos 1) gives the same row.
    (fast ? attention : attention_ref)(q + 2, k, v, out, 1, 1, s, 1.0f);
    EXPECT_NEAR(out[0], 1.5378828f, 1e-6);
    EXPECT_NEAR(out[1], 2.5378828f, 1e-6);
  }
}

// softmax(q K^T * scale) V computed directly as matrices for one head, against both versions.
TEST(Attention, OneHeadEqualsDirectSoftmaxQKtV) {
  const int64_t T = 5, start = 3, D = 16, L = start + T;
  const auto q = testing::random_vec(T * D, 1), k = testing::random_vec(L * D, 2),
             v = testing::random_vec(L * D, 3);
  const float scale = 0.25f;
  std::vector<float> direct(T * D, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> p(L, 0.0);
    double sum = 0;
    for (int64_t j = 0; j <= start + t; ++j) {  // mask: j > start + t gets weight 0
      double d = 0;
      for (int64_t i = 0; i < D; ++i) d += q[t * D + i] * k[j * D + i];
      p[j] = std::exp(d * scale);
      sum += p[j];
    }
    for (int64_t i = 0; i < D; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < L; ++j) acc += p[j] / sum * v[j * D + i];
      direct[t * D + i] = static_cast<float>(acc);
    }
  }
  const AttentionShape s{1, 1, D, D};
  std::vector<float> fast(T * D), ref(T * D);
  attention(q.data(), k.data(), v.data(), fast.data(), T, start, s, scale);
  attention_ref(q.data(), k.data(), v.data(), ref.data(), T, start, s, scale);
  EXPECT_LT(testing::normalised_error(ref, direct), 4 * kU);
  EXPECT_LT(testing::normalised_error(fast, direct), 4 * (D + L + 8) * kU);
}

TEST(Attention, MatchesReferenceOverGroupsAndPositions) {
  for (int threads : {1, 3}) {
    ThreadPool pool(threads);
    ScopedPool scoped(pool);
    for (SimdLevel level : testing::supported_levels()) {
      testing::ScopedSimd simd(level);
      for (int64_t ratio : {1, 2, 4}) {
        for (int64_t D : {8, 13, 64}) {
          for (auto [T, start] :
               {std::pair<int64_t, int64_t>{1, 0}, {1, 9}, {3, 0}, {5, 4}, {2, 30}}) {
            const int64_t kv = 2, H = kv * ratio, L = start + T;
            // The cache holds room for 40 positions, with 3 spare floats per position.
            const int64_t stride = kv * D + 3;
            const auto q = testing::random_vec(T * H * D, 11, -2, 2);
            const auto k = testing::random_vec(40 * stride, 12, -2, 2);
            const auto v = testing::random_vec(40 * stride, 13);
            const AttentionShape s{H, kv, D, stride};
            const float scale = 1.0f / std::sqrt(static_cast<float>(D));
            std::vector<float> fast(T * H * D), ref(T * H * D);
            attention(q.data(), k.data(), v.data(), fast.data(), T, start, s, scale);
            attention_ref(q.data(), k.data(), v.data(), ref.data(), T, start, s, scale);
            // Scores carry ~D u, softmax ~L u (exp within 2 ulp), the weighted sum ~L u more.
            EXPECT_LT(testing::normalised_error(fast, ref), 4 * (D + 2 * L + 8) * kU)
                << simd_name(level) << " threads=" << threads << " ratio=" << ratio << " D=" << D
                << " T=" << T << " start=" << start;
          }
        }
      }
    }
  }
}

TEST(Attention, RegisterKernelIsTheVecKernelsBitForBit) {
  // head_dim a multiple of 16 up to 128 runs attend_avx2 (q and the output row in registers): the
  // same bits as a loop of vec::dot, vec::softmax and vec::axpy, the general path.
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  for (SimdLevel level : testing::supported_levels()) {
    testing::ScopedSimd simd(level);
    for (int64_t D : {16, 48, 64, 128}) {
      const int64_t kv = 2, H = 4, T = 6, start = 5, stride = kv * D + 3;
      const auto q = testing::random_vec(T * H * D, 21, -2, 2);
      const auto k = testing::random_vec(16 * stride, 22, -2, 2);
      const auto v = testing::random_vec(16 * stride, 23);
      const float scale = 1.0f / std::sqrt(static_cast<float>(D));
      std::vector<float> fast(T * H * D), loop(T * H * D);
      attention(q.data(), k.data(), v.data(), fast.data(), T, start, {H, kv, D, stride}, scale);
      std::vector<float> scores(start + T);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t len = start + t + 1, item = t * H + h;
          for (int64_t p = 0; p < len; ++p)
            scores[p] = scale * vec::dot(q.data() + item * D,
                                         k.data() + p * stride + (h / 2) * D, D, level);
          vec::softmax(scores.data(), len, level);
          float* o = loop.data() + item * D;
          for (int64_t p = 0; p < len; ++p)
            vec::axpy(scores[p], v.data() + p * stride + (h / 2) * D, o, D, level);
        }
      EXPECT_EQ(std::memcmp(fast.data(), loop.data(), fast.size() * 4), 0)
          << simd_name(level) << " D=" << D;
    }
  }
}

TEST(Attention, RejectsBadShapes) {
  float x[8] = {};
  try {
    attention(x, x, x, x, 1, 0, AttentionShape{3, 2, 2, 4}, 1.0f);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("q_heads (3)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(attention(x, x, x, x, 1, 0, AttentionShape{2, 2, 2, 3}, 1.0f),
               std::invalid_argument);
  EXPECT_THROW(attention_ref(x, x, x, x, 1, -1, AttentionShape{1, 1, 2, 2}, 1.0f),
               std::invalid_argument);
}

}  // namespace
}  // namespace parallm::kernels
