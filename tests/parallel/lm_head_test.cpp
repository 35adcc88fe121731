// The vocab-parallel LM head at TP 1..4 against the full head, and the exchanges the sampler runs
// over the split, with ids above 2^24 (not representable as f32) that must arrive exactly.
#include "parallm/parallel/lm_head.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/kernels/matmul.h"

namespace parallm::parallel {
namespace {

constexpr int32_t kBig = (1 << 24) + 1;  // the first integer f32 cannot hold

void on_ranks(int p, const std::function<void(const comm::Group&, std::vector<std::string>&)>& fn) {
  std::mutex mu;
  std::vector<std::string> errors;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(p, lo, [&](comm::Group world) {
    std::vector<std::string> mine;
    fn(world, mine);
    std::lock_guard<std::mutex> lock(mu);
    for (auto& e : mine) errors.push_back("rank " + std::to_string(world.rank()) + ": " + e);
  });
  for (const auto& e : errors) ADD_FAILURE() << "tp " << p << ": " << e;
}

// Integer-valued tensors: products and sums are exact, in f32 and bf16 alike.
Tensor int_weight(int64_t vocab, int64_t hidden, DType dtype) {
  Tensor w = Tensor::empty(DType::F32, {vocab, hidden});
  for (int64_t v = 0; v < vocab; ++v)
    for (int64_t h = 0; h < hidden; ++h)
      w.data<float>()[v * hidden + h] = static_cast<float>((v * 7 + h * 3) % 9 - 4);
  return w.to(dtype);
}

class LmHead : public ::testing::TestWithParam<int> {};

TEST_P(LmHead, ForwardAndGatherEqualTheFullHead) {
  const int p = GetParam();
  const int64_t V = 13, H = 6, R = 3;
  std::vector<float> x(R * H);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i % 5) - 2);
  for (DType dtype : {DType::F32, DType::BF16}) {
    const Tensor full_w = int_weight(V, H, dtype);
    std::vector<float> want(R * V);
    kernels::matmul(x.data(), R, full_w, want.data());
    on_ranks(p, [&](const comm::Group& g, std::vector<std::string>& errors) {
      const ShardSpec s = ShardSpec::even(V, p, g.rank());
      VocabParallelLmHead head(full_w.slice_rows(s.begin, s.end).contiguous(), s, g);
      EXPECT_EQ(head.vocab(), V);
      EXPECT_EQ(head.hidden(), H);
      std::vector<float> local(R * s.size());
      head.forward(x.data(), R, local.data());
      for (int64_t t = 0; t < R; ++t)
        for (int64_t v = 0; v < s.size(); ++v)
          if (local[t * s.size() + v] != want[t * V + s.begin + v])
            errors.push_back("logit [" + std::to_string(t) + ", " + std::to_string(s.begin + v) +
                             "] " + std::string(dtype_name(dtype)));
      std::vector<float> all(R * V, -99.0f);
      head.gather_logits(local.data(), R, all.data());
      if (all != want) errors.push_back("gather_logits(R) " + std::string(dtype_name(dtype)));
      for (int64_t t = 0; t < R; ++t) {
        const std::vector<float> row = head.gather_logits(local.data() + t * s.size());
        if (row != std::vector<float>(want.begin() + t * V, want.begin() + (t + 1) * V))
          errors.push_back("gather_logits row " + std::to_string(t));
      }
    });
  }
}

TEST_P(LmHead, ExchangesAgreeAndCarryIdsAbove2To24Exactly) {
  const int p = GetParam();
  on_ranks(p, [&](const comm::Group& g, std::vector<std::string>& errors) {
    const VocabExchange ex(g);
    const int r = g.rank();
    // argmax: every rank ties on the logit; the lowest id wins. Ids differ by one above 2^24.
    const VocabCandidate best = ex.argmax({2.5f, kBig + 2 * (p - r)});
    if (best.id != kBig + 2 || best.logit != 2.5f)
      errors.push_back("argmax tie: id " + std::to_string(best.id));
    // A strictly higher logit on the last rank wins whatever its id.
    const VocabCandidate top = ex.argmax({r == p - 1 ? 3.0f : 1.0f, kBig + r});
    if (top.id != kBig + p - 1) errors.push_back("argmax: id " + std::to_string(top.id));
    // max / sum / gather of floats.
    if (ex.max(static_cast<float>(r)) != static_cast<float>(p - 1)) errors.push_back("max");
    if (ex.sum(static_cast<float>(r + 1)) != static_cast<float>(p * (p + 1) / 2))
      errors.push_back("sum");
    std::vector<float> v = {static_cast<float>(r), -static_cast<float>(r)};
    ex.max(v.data(), 2);
    if (v[0] != p - 1 || v[1] != 0) errors.push_back("max of a vector");
    const std::vector<float> each = ex.gather(static_cast<float>(10 * r));
    for (int q = 0; q < p; ++q)
      if (each[q] != 10.0f * q) errors.push_back("gather[" + std::to_string(q) + "]");
    // share_id: the owner's odd id above 2^24, not rounded.
    for (int owner = 0; owner < p; ++owner) {
      const int32_t id = ex.share_id(r == owner ? kBig + 2 * owner : -1, owner);
      if (id != kBig + 2 * owner) errors.push_back("share_id: " + std::to_string(id));
    }
    // all_candidates: rank r offers r + 1 candidates (rank 1 none), in rank order.
    std::vector<VocabCandidate> mine;
    if (r != 1)
      for (int i = 0; i <= r; ++i) mine.push_back({static_cast<float>(-i), kBig + 100 * r + i});
    const std::vector<VocabCandidate> all = ex.all_candidates(mine);
    std::vector<VocabCandidate> want;
    for (int q = 0; q < p; ++q)
      if (q != 1)
        for (int i = 0; i <= q; ++i) want.push_back({static_cast<float>(-i), kBig + 100 * q + i});
    if (all.size() != want.size() ||
        std::memcmp(all.data(), want.data(), want.size() * sizeof(VocabCandidate)) != 0)
      errors.push_back("all_candidates: " + std::to_string(all.size()) + " of " +
                       std::to_string(want.size()));
    // Nobody offers anything.
    if (!ex.all_candidates({}).empty()) errors.push_back("all_candidates of nothing");
  });
}

INSTANTIATE_TEST_SUITE_P(TpSizes, LmHead, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return "tp" + std::to_string(info.param); });

TEST(LmHead, RefusesAShardThatIsNotTheNearEvenSplit) {
  on_ranks(2, [](const comm::Group& g, std::vector<std::string>& errors) {
    const ShardSpec wrong{10, g.rank() * 4, g.rank() * 4 + 4};  // even would be [0,5) / [5,10)
    try {
      VocabParallelLmHead head(Tensor::zeros(DType::F32, {4, 3}), wrong, g);
      errors.push_back("accepted a wrong shard");
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).find("near-even split") == std::string::npos)
        errors.push_back(std::string("message: ") + e.what());
    }
  });
  // And a weight whose rows do not match the shard.
  EXPECT_THROW(
      VocabParallelLmHead(Tensor::zeros(DType::F32, {4, 3}), ShardSpec{5, 0, 5}, comm::Group()),
      std::invalid_argument);
}

}  // namespace
}  // namespace parallm::parallel
