// The step plan's flat form round-trips, a malformed one is refused, and the broadcast gives every
// TP rank the first rank's plan (ids included) within the fixed limits.
#include "parallm/engine/step_plan.h"

#include <gtest/gtest.h>

#include "parallm/comm/launch.h"

namespace parallm {
namespace {

StepPlan sample_plan() {
  StepPlan p;
  p.entries = {{3, 0, 4, false}, {5, 17, 1, true}};
  p.ids = {1, 2, 3, 4, 99};
  return p;
}

void expect_same(const StepPlan& a, const StepPlan& b, bool ids) {
  ASSERT_EQ(a.entries.size(), b.entries.size());
  for (size_t k = 0; k < a.entries.size(); ++k) {
    EXPECT_EQ(a.entries[k].slot, b.entries[k].slot);
    EXPECT_EQ(a.entries[k].start_pos, b.entries[k].start_pos);
    EXPECT_EQ(a.entries[k].n_tokens, b.entries[k].n_tokens);
    EXPECT_EQ(a.entries[k].sample, b.entries[k].sample);
  }
  EXPECT_EQ(a.exit, b.exit);
  if (ids) {
    EXPECT_EQ(a.ids, b.ids);
  }
}

TEST(StepPlan, FlatFormRoundTrips) {
  StepPlan p = sample_plan();
  EXPECT_EQ(p.tokens(), 5);
  EXPECT_EQ(p.samples(), 1);
  std::vector<int64_t> v = p.encode(true);
  EXPECT_EQ(v.size(), static_cast<size_t>(StepPlan::wire_size(2, 5)));
  expect_same(StepPlan::decode(v.data(), v.size()), p, true);
  // Without ids (what later stages get), and the exit flag.
  p.exit = true;
  v = p.encode(false);
  StepPlan q = StepPlan::decode(v.data(), v.size());
  expect_same(q, p, false);
  EXPECT_TRUE(q.ids.empty());
  // A header that claims more than the values hold.
  v[1] = 9;
  EXPECT_THROW(StepPlan::decode(v.data(), v.size()), std::runtime_error);
}

TEST(StepPlan, BroadcastReachesEveryTpRank) {
  for (int tp : {1, 2, 3, 5}) {
    comm::LaunchOptions lo;
    lo.backend = "local";
    lo.timeout_s = 30;
    comm::launch(tp, lo, [&](comm::Group g) {
      StepPlan p;
      if (g.rank() == 0) p = sample_plan();
      broadcast_plan(p, g, 0, /*max_entries=*/4, /*max_ids=*/8);
      expect_same(p, sample_plan(), true);
      // Over the limits: the root refuses (alone, before any rank waits on it).
      if (g.rank() == 0) {
        EXPECT_THROW(broadcast_plan(p, g, 0, 1, 8), std::invalid_argument) << tp;
      }
    });
  }
}

}  // namespace
}  // namespace parallm
