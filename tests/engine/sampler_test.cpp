#include "parallm/engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/parallel/shard.h"

namespace parallm {
namespace {

TEST(Sampler, GreedyPicksTheArgmaxAndLowestIdOnTies) {
  Sampler s({0.0f, 0, 1.0f, 0}, comm::Group());
  const float logits[] = {0.1f, 3.0f, -1.0f, 3.0f, 2.9f};
  EXPECT_EQ(s.sample(logits, 0, 5), 1);
  // Ids are global: this shard starts at 100.
  EXPECT_EQ(s.sample(logits, 100, 105), 101);
  const float with_nan[] = {NAN, 0.5f, 0.25f};
  EXPECT_EQ(s.sample(with_nan, 0, 3), 1);
}

std::map<int, double> frequencies(SamplingParams p, const std::vector<float>& logits, int draws) {
  Sampler s(p, comm::Group());
  std::map<int, double> f;
  for (int i = 0; i < draws; ++i)
    f[s.sample(logits.data(), 0, static_cast<int64_t>(logits.size()))] += 1.0 / draws;
  return f;
}

TEST(Sampler, TemperatureSamplingFollowsTheSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 0.0f, 1.5f};
  const float t = 0.7f;
  double z = 0;
  for (float l : logits) z += std::exp(l / t);
  auto f = frequencies({t, 0, 1.0f, 42}, logits, 40000);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f[i], std::exp(logits[i] / t) / z, 0.01) << i;
}

TEST(Sampler, TopKAndTopPRestrictTheSupport) {
  const std::vector<float> logits = {1.0f, 4.0f, 0.0f, 3.0f, 2.0f};
  // top-k 2: only ids 1 and 3, in proportion e^4 : e^3.
  auto f = frequencies({1.0f, 2, 1.0f, 7}, logits, 20000);
  EXPECT_EQ(f.size(), 2u);
  EXPECT_NEAR(f[1], 1.0 / (1.0 + std::exp(-1.0)), 0.015);
  // top-p 0.7: softmax = [.032 .636 .012 .234 .086]; the nucleus reaching 0.7 is {1, 3}.
  auto g = frequencies({1.0f, 0, 0.7f, 7}, logits, 20000);
  EXPECT_EQ(g.size(), 2u);
  EXPECT_GT(g[1], 0.7);
  // top-p 0.5: the most likely token alone already reaches it.
  auto h = frequencies({1.0f, 0, 0.5f, 7}, logits, 2000);
  EXPECT_EQ(h.size(), 1u);
  EXPECT_EQ(h.begin()->first, 1);
}

TEST(Sampler, SameSeedSameTokens) {
  const std::vector<float> logits = {0.3f, 0.2f, 0.1f, 0.0f, 0.25f};
  Sampler a({1.0f, 0, 0.9f, 123}, comm::Group()), b({1.0f, 0, 0.9f, 123}, comm::Group());
  for (int i = 0; i < 50; ++i)
    EXPECT_EQ(a.sample(logits.data(), 0, 5), b.sample(logits.data(), 0, 5));
}

TEST(Sampler, RejectsBadParameters) {
  EXPECT_THROW(validate_sampling({-1.0f, 0, 1.0f, 0}), std::invalid_argument);
  EXPECT_THROW(validate_sampling({1.0f, -2, 1.0f, 0}), std::invalid_argument);
  EXPECT_THROW(validate_sampling({1.0f, 0, 0.0f, 0}), std::invalid_argument);
  EXPECT_THROW(validate_sampling({1.0f, 0, 1.5f, 0}), std::invalid_argument);
}

// Ids above 2^24 reach the sampler: the vocabulary slice starts at kBase (the sampler takes
// (logits, vocab_begin, vocab_end), so no huge tensor is needed). Odd ids there are not f32
// values, so an id that travelled as a float would come out rounded.
constexpr int64_t kBase = (int64_t{1} << 24) + 3;
constexpr int64_t kVocab = 1000;

std::vector<float> small_logits(uint32_t seed) {
  std::vector<float> l(kVocab);
  std::mt19937 g(seed);
  for (float& v : l) v = static_cast<float>(static_cast<int>(g() % 7) - 3) * 0.5f;
  return l;
}

// Draws `draws` tokens at TP p (ranks as threads, each holding its near-even slice of `logits`
// at kBase + begin); checks that all ranks agree and returns rank 0's tokens.
std::vector<int64_t> draw_tp(int p, SamplingParams params, const std::vector<float>& logits,
                             int draws) {
  std::vector<std::vector<int64_t>> got(p);
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(p, lo, [&](comm::Group world) {
    const parallel::ShardSpec s = parallel::ShardSpec::even(kVocab, p, world.rank());
    Sampler sampler(params, world);
    for (int i = 0; i < draws; ++i)
      got[world.rank()].push_back(
          sampler.sample(logits.data() + s.begin, kBase + s.begin, kBase + s.end));
  });
  for (int r = 1; r < p; ++r) EXPECT_EQ(got[r], got[0]) << "rank " << r << " of " << p;
  return got[0];
}

TEST(Sampler, IdsAbove2To24ComeOutExactAtEveryTpSize) {
  const SamplingParams modes[] = {{0.0f, 0, 1.0f, 5},   // greedy
                                  {1.0f, 0, 1.0f, 5},   // temperature only
                                  {1.0f, 4, 1.0f, 5},   // top-k
                                  {1.0f, 0, 0.9f, 5},   // top-p
                                  {0.8f, 3, 0.5f, 5}};  // both
  for (int64_t peak : {int64_t{2}, int64_t{500}, kVocab - 2}) {
    std::vector<float> logits = small_logits(static_cast<uint32_t>(peak));
    logits[peak] = 60.0f;  // all the mass, at an odd id above 2^24
    ASSERT_NE(static_cast<int64_t>(static_cast<float>(kBase + peak)), kBase + peak);
    for (int p = 1; p <= 4; ++p)
      for (const SamplingParams& m : modes)
        for (int64_t id : draw_tp(p, m, logits, 4))
          EXPECT_EQ(id, kBase + peak) << "tp " << p << " temperature " << m.temperature << " top-k "
                                      << m.top_k << " top-p " << m.top_p;
  }
}

TEST(Sampler, TopKDrawsAreTheSameAtEveryTpSize) {
  // Top-k measures mass within the k candidates, which every TP size exchanges whole and sorts
  // the same way: the same seed draws the same tokens, ids above 2^24 included.
  const std::vector<float> logits = small_logits(11);
  const SamplingParams params{1.0f, 8, 1.0f, 77};
  const std::vector<int64_t> one = draw_tp(1, params, logits, 40);
  std::map<int64_t, int> seen;
  for (int64_t id : one) {
    EXPECT_GE(id, kBase);
    EXPECT_LT(id, kBase + kVocab);
    ++seen[id];
  }
  EXPECT_GT(seen.size(), 2u);  // really sampling, not always one token
  for (int p = 2; p <= 4; ++p) EXPECT_EQ(draw_tp(p, params, logits, 40), one) << "tp " << p;
}

TEST(Sampler, RefusesASliceBeyondInt32Ids) {
  Sampler s({0.0f, 0, 1.0f, 0}, comm::Group());
  const float logits[] = {1.0f, 2.0f};
  const int64_t top = int64_t{1} << 31;
  EXPECT_THROW(s.sample(logits, top - 1, top + 1), std::invalid_argument);
  EXPECT_EQ(s.sample(logits, top - 2, top), top - 1);
}

}  // namespace
}  // namespace parallm
