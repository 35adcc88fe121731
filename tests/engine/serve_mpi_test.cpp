// The serving engine under mpirun, one process per rank (tests/engine/tests.cmake runs it with
// `mpirun -np 2`: PP 2, and `-np 4`: TP 2 x PP 2): world rank 0's process holds the ServeEngine,
// the others run run_serve_follower; greedy outputs equal `parallm generate`'s, and shutdown ends
// the followers (their calls return). Skipped outside mpirun.
#include <gtest/gtest.h>

#include "serve_test_util.h"

namespace parallm::serve {
namespace {

TEST(ServeMpi, RankZeroServesAndTheFollowerLeavesAtShutdown) {
  if (!comm::under_mpirun()) GTEST_SKIP() << "runs under mpirun only (tests/engine/tests.cmake)";
  testing::Watchdog dog(120);
  // 2 processes: PP 2; 4: TP 2 x PP 2.
  const int np = comm::launched_size(), tp = np % 2 == 0 && np >= 4 ? 2 : 1;
  ServeConfig c = testing::stories_config(tp, np / tp);
  c.backend = "mpi";
  if (!serve_process_is_root()) {
    run_serve_follower(c);  // returns at rank 0's exit message
    return;
  }
  const auto prompts = testing::mixed_prompts(6, 20, 17);
  const std::vector<int64_t> max_tokens = {3, 9, 1, 12, 6, 8};
  const auto want = testing::reference(prompts, max_tokens, true);
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine, 60)) << engine->failure();
  testing::Sink sink;
  std::vector<std::shared_ptr<testing::Outcome>> outs(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenParams g;
    g.max_tokens = max_tokens[i];
    g.temperature = 0;
    g.ignore_eos = true;
    sink.submit(*engine, prompts[i], g, &outs[i]);
  }
  ASSERT_TRUE(sink.wait(outs, 60)) << engine->failure();
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(sink.get(outs[i]).tokens, want[i]) << "request " << i;
  engine->shutdown();
  EXPECT_TRUE(engine->failure().empty()) << engine->failure();
}

}  // namespace
}  // namespace parallm::serve
