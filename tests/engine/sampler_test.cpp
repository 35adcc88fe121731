#include "parallm/engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

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

}  // namespace
}  // namespace parallm
