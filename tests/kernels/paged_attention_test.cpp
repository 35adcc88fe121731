// Paged attention (vLLM's block tables): bit for bit the contiguous kernel's output on the same
// keys and values scattered over shuffled blocks, and the paged reference within 1e-5 of the
// contiguous reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "parallm/kernels/attention.h"

namespace parallm::kernels {
namespace {

TEST(PagedAttention, EqualsContiguousAttentionBitForBit) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int64_t bs : {1, 4, 16}) {
    for (auto [T, start] : {std::pair<int64_t, int64_t>{1, 0}, {1, 37}, {9, 0}, {5, 22}}) {
      const AttentionShape s{8, 4, 8, 40};  // kv_stride > kv_heads * head_dim: padded rows
      const int64_t len = start + T, blocks = (len + bs - 1) / bs, pool = blocks + 3;
      std::vector<float> q(T * 8 * 8), k(len * 40), v(len * 40);
      for (float& x : q) x = u(rng);
      for (float& x : k) x = u(rng);
      for (float& x : v) x = u(rng);
      std::vector<int32_t> table(pool);
      std::iota(table.begin(), table.end(), 0);
      std::shuffle(table.begin(), table.end(), rng);
      std::vector<float> kp(pool * bs * 40, 99.0f), vp(pool * bs * 40, 99.0f);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t row = table[p / bs] * bs + p % bs;
        std::copy(&k[p * 40], &k[p * 40] + 40, &kp[row * 40]);
        std::copy(&v[p * 40], &v[p * 40] + 40, &vp[row * 40]);
      }
      const int64_t n = T * 8 * 8;
      std::vector<float> want(n), got(n), want_ref(n), got_ref(n);
      attention(q.data(), k.data(), v.data(), want.data(), T, start, s, 0.35f);
      const PagedCache c{kp.data(), vp.data(), table.data(), bs};
      attention_paged(q.data(), c, got.data(), T, start, s, 0.35f);
      EXPECT_EQ(got, want) << "block size " << bs << ", T " << T << ", start " << start;
      attention_ref(q.data(), k.data(), v.data(), want_ref.data(), T, start, s, 0.35f);
      attention_paged_ref(q.data(), c, got_ref.data(), T, start, s, 0.35f);
      EXPECT_EQ(got_ref, want_ref);
      for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], want_ref[i], 1e-5);
    }
  }
}

TEST(PagedAttention, RefusesAMissingTable) {
  const AttentionShape s{2, 2, 4, 8};
  std::vector<float> q(8), out(8), pool(64);
  EXPECT_THROW(attention_paged(q.data(), {pool.data(), pool.data(), nullptr, 4}, out.data(), 1, 0,
                               s, 1.0f),
               std::invalid_argument);
}

}  // namespace
}  // namespace parallm::kernels
