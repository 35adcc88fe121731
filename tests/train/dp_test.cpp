// The data-parallel reducer alone, on synthetic flat buffers over local threads: bucketed
// all-reduce (overlapped, hooks in any order or missing), ZeRO-1's reduce-scatter, sharded AdamW
// and all-gather against an unsharded update, the optimizer state's gather/scatter, and the
// optimizer bytes per rank.
#include "parallm/train/dp.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "parallm/comm/launch.h"

namespace parallm::train {
namespace {

// A layout of `sizes` floats per parameter, each starting at a multiple of 16 floats (as
// ParamStore lays them out); every other one decays, every third is TP-replicated (on 2 ranks).
std::vector<Param> make_layout(const std::vector<int64_t>& sizes, int64_t* total) {
  std::vector<Param> out;
  int64_t off = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    Param p;
    p.tensor.name = "p" + std::to_string(i);
    p.tensor.shape = {sizes[i]};
    p.local_shape = {sizes[i]};
    p.offset = off;
    p.numel = sizes[i];
    p.decay = i % 2 == 0;
    p.tp_replicated = i % 3 == 1;
    p.tp_replicas = i % 3 == 1 ? 2 : 1;
    out.push_back(p);
    off += (sizes[i] + 15) / 16 * 16;
  }
  *total = off;
  return out;
}

float grad_value(int rank, int64_t i, int step) {
  return std::sin(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(rank) +
                  0.11f * static_cast<float>(step)) *
         0.01f;
}

const std::vector<int64_t> kSizes = {100, 7, 33, 260, 1, 64, 17, 90, 5};

TEST(DataParallel, BucketsTileTheBufferFromTheEnd) {
  int64_t size = 0;
  const auto layout = make_layout(kSizes, &size);
  DataParallel dp(layout, size, nullptr, nullptr, comm::Group(), {256, false, true});
  ASSERT_GT(dp.buckets().size(), 3u);
  EXPECT_EQ(dp.buckets().front().end, size);           // the last parameters first
  EXPECT_EQ(dp.buckets().back().begin, 0);             // the embedding's end of the buffer last
  for (size_t b = 1; b < dp.buckets().size(); ++b)
    EXPECT_EQ(dp.buckets()[b].end, dp.buckets()[b - 1].begin);
  // One bucket for everything when the bucket is large.
  DataParallel one(layout, size, nullptr, nullptr, comm::Group(), {int64_t{1} << 30, false, true});
  EXPECT_EQ(one.buckets().size(), 1u);
}

// Every DP rank ends with the sum of all ranks' gradients, whatever order its hooks come in, with
// some never called and the backward still writing other parameters while buckets go out.
void check_all_reduce(int dp_size, bool overlap, int64_t bucket_bytes) {
  int64_t size = 0;
  const auto layout = make_layout(kSizes, &size);
  comm::launch(dp_size, {.backend = "local", .timeout_s = 30}, [&](comm::Group world) {
    std::vector<float> values(size, 0.0f), grads(size, 0.0f);
    DataParallel dp(layout, size, values.data(), grads.data(), world, {bucket_bytes, false, overlap});
    int early = 0;
    for (int step = 0; step < 3; ++step) {
      std::fill(grads.begin(), grads.end(), 0.0f);
      dp.begin_sync();
      // The "backward": last parameter first, each written then announced; rank 1 skips a hook.
      for (int k = static_cast<int>(layout.size()) - 1; k >= 0; --k) {
        const Param& p = layout[k];
        for (int64_t i = 0; i < p.numel; ++i)
          grads[p.offset + i] = grad_value(world.rank(), p.offset + i, step);
        if (!(world.rank() == 1 && k == 4)) dp.grad_ready(p);
        if (k % 3 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      dp.finish_sync();
      // Overlapped: buckets went out while the "backward" still ran (it sleeps between
      // parameters); otherwise none did.
      early += dp.early_buckets();
      if (!overlap) {
        EXPECT_EQ(dp.early_buckets(), 0);
      }
      EXPECT_LE(dp.early_buckets(), static_cast<int>(dp.buckets().size()));
      for (const Param& p : layout)
        for (int64_t i = 0; i < p.numel; ++i) {
          float want = 0;
          for (int r = 0; r < dp_size; ++r) want += grad_value(r, p.offset + i, step);
          ASSERT_NEAR(grads[p.offset + i], want, 1e-6f) << p.tensor.name << "[" << i << "]";
        }
      EXPECT_DOUBLE_EQ(dp.sum_over_dp(world.rank() + 0.5), dp_size * dp_size / 2.0);
    }
    if (overlap) {
      EXPECT_GT(early, 0);
    }
  });
}

TEST(DataParallel, AllReduceDp2Overlapped) { check_all_reduce(2, true, 300); }
TEST(DataParallel, AllReduceDp3Overlapped) { check_all_reduce(3, true, 128); }
TEST(DataParallel, AllReduceDp3AfterBackward) { check_all_reduce(3, false, 1000); }

// ZeRO-1 over DP ranks against one rank that holds the summed gradients and the whole state:
// the same values after several steps on every rank, and the gathered m and v equal.
void check_zero(int dp_size, int64_t bucket_bytes) {
  int64_t size = 0;
  const auto layout = make_layout(kSizes, &size);
  AdamWConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.1;
  std::vector<float> init(size);
  for (int64_t i = 0; i < size; ++i) init[i] = std::cos(0.1f * static_cast<float>(i));
  for (const Param& p : layout)  // padding stays zero, as in a ParamStore
    (void)p;
  std::vector<char> is_param(size, 0);
  for (const Param& p : layout) std::fill(is_param.begin() + p.offset, is_param.begin() + p.offset + p.numel, 1);
  for (int64_t i = 0; i < size; ++i)
    if (!is_param[i]) init[i] = 0;
  // The reference: one rank, the sum of every rank's gradients.
  std::vector<float> ref = init, ref_g(size), ref_m(size), ref_v(size);
  {
    DataParallel one(layout, size, ref.data(), ref_g.data(), comm::Group(), {bucket_bytes, false, true});
    for (int step = 0; step < 4; ++step) {
      std::fill(ref_g.begin(), ref_g.end(), 0.0f);
      for (const Param& p : layout)
        for (int64_t i = 0; i < p.numel; ++i)
          for (int r = 0; r < dp_size; ++r) ref_g[p.offset + i] += grad_value(r, p.offset + i, step);
      one.step(c, c.lr, step + 1, 0.5f);
    }
    one.gather_state(ref_m.data(), ref_v.data());
  }
  std::mutex mu;
  std::vector<uint64_t> bytes(dp_size);
  comm::launch(dp_size, {.backend = "local", .timeout_s = 30}, [&](comm::Group world) {
    std::vector<float> values = init, grads(size, 0.0f);
    DataParallel dp(layout, size, values.data(), grads.data(), world, {bucket_bytes, true, true});
    for (int step = 0; step < 4; ++step) {
      std::fill(grads.begin(), grads.end(), 0.0f);
      dp.begin_sync();
      for (int k = static_cast<int>(layout.size()) - 1; k >= 0; --k) {
        const Param& p = layout[k];
        for (int64_t i = 0; i < p.numel; ++i)
          grads[p.offset + i] = grad_value(world.rank(), p.offset + i, step);
        dp.grad_ready(p);
      }
      dp.finish_sync();
      dp.step(c, c.lr, step + 1, 0.5f);
    }
    for (int64_t i = 0; i < size; ++i)
      ASSERT_NEAR(values[i], ref[i], 1e-6f) << "rank " << world.rank() << " value " << i;
    std::vector<float> m(size), v(size);
    dp.gather_state(m.data(), v.data());
    for (int64_t i = 0; i < size; ++i) {
      ASSERT_NEAR(m[i], ref_m[i], 1e-7f) << i;
      ASSERT_NEAR(v[i], ref_v[i], 1e-9f) << i;
    }
    // scatter_state puts back exactly what this rank owns.
    std::vector<float> own_m(dp.m(), dp.m() + dp.state_size());
    std::fill(dp.m(), dp.m() + dp.state_size(), 0.0f);
    dp.scatter_state(m.data(), v.data());
    EXPECT_TRUE(std::equal(own_m.begin(), own_m.end(), dp.m()));
    std::lock_guard<std::mutex> lock(mu);
    bytes[world.rank()] = dp.optimizer_bytes();
    // Owned state: the rank's chunks of every bucket, about 1/DP of the buffer.
    int64_t owned = 0;
    for (const auto& b : dp.buckets())
      owned += std::clamp<int64_t>(b.end - b.begin - world.rank() * b.chunk, 0, b.chunk);
    EXPECT_GE(owned, dp.state_size());  // padding inside chunks holds no state
  });
}

TEST(DataParallel, ZeroDp2MatchesOneRank) { check_zero(2, 256); }
TEST(DataParallel, ZeroDp3MatchesOneRank) { check_zero(3, 200); }
TEST(DataParallel, ZeroDp3OneBucket) { check_zero(3, int64_t{1} << 30); }

// What a rank holds: 4 + 4 bytes per float of values and grads, plus m and v for its share:
// 16 bytes per parameter without ZeRO, 8 + 8/DP with it (up to the padding of chunks).
TEST(DataParallel, OptimizerBytesPerRank) {
  int64_t size = 0;
  const auto layout = make_layout({4096, 1024, 4096, 4096, 64, 8192}, &size);
  const int64_t numel = 4096 * 3 + 1024 + 64 + 8192;
  ASSERT_EQ(size, numel);  // sizes are multiples of 16: no padding
  {
    DataParallel dp(layout, size, nullptr, nullptr, comm::Group(), {4096, false, true});
    EXPECT_EQ(dp.optimizer_bytes(), uint64_t(16 * numel));
  }
  for (int D : {2, 4}) {
    std::vector<uint64_t> bytes(D);
    comm::launch(D, {.backend = "local", .timeout_s = 30}, [&](comm::Group world) {
      std::vector<float> values(size), grads(size);
      DataParallel dp(layout, size, values.data(), grads.data(), world, {16384, true, true});
      bytes[world.rank()] = dp.optimizer_bytes();
    });
    uint64_t total = 0;
    for (int r = 0; r < D; ++r) {
      const double per_param = static_cast<double>(bytes[r]) / numel;
      EXPECT_NEAR(per_param, 8.0 + 8.0 / D, 0.05) << "DP " << D << " rank " << r;
      total += bytes[r] - 8 * numel;
    }
    EXPECT_EQ(total, uint64_t(8 * numel));  // m and v: every element exactly once over DP
  }
}

}  // namespace
}  // namespace parallm::train
