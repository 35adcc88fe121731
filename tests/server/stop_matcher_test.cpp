#include "parallm/server/stop_matcher.h"

#include <gtest/gtest.h>

namespace parallm::server {
namespace {

TEST(StopMatcher, HoldsBackWhatCouldStartAStopString) {
  StopMatcher m({"STOP", "xy"});
  EXPECT_EQ(m.push("abc S"), "abc ");  // "S" could start STOP
  EXPECT_EQ(m.push("T"), "");          // "ST" too
  EXPECT_EQ(m.push("x"), "ST");        // "STx" cannot, but "x" could start "xy"
  EXPECT_EQ(m.push("z"), "xz");
  EXPECT_FALSE(m.stopped());
}

TEST(StopMatcher, StopsAcrossPiecesAndDropsTheRest) {
  StopMatcher m({"STOP"});
  EXPECT_EQ(m.push("abc S"), "abc ");
  EXPECT_EQ(m.push("TO"), "");
  EXPECT_EQ(m.push("Xd"), "STOXd");
  EXPECT_EQ(m.push("ST"), "");
  EXPECT_EQ(m.push("OP tail"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.push("more"), "");
  EXPECT_EQ(m.finish(), "");
}

TEST(StopMatcher, EarliestMatchWins) {
  StopMatcher m({"c d", "b c"});
  EXPECT_EQ(m.push("a b"), "a ");
  EXPECT_EQ(m.push(" c d"), "");  // "b c" starts before "c d"
  EXPECT_TRUE(m.stopped());
}

TEST(StopMatcher, FinishReleasesAnUnfinishedPrefix) {
  StopMatcher m({"end"});
  EXPECT_EQ(m.push("the en"), "the ");
  EXPECT_EQ(m.finish(), "en");
  StopMatcher none;
  EXPECT_EQ(none.push("anything"), "anything");
  EXPECT_EQ(none.finish(), "");
  EXPECT_FALSE(none.stopped());
}

}  // namespace
}  // namespace parallm::server
