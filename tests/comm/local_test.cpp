// The local backend (ranks as threads): the conformance suite at world sizes 1, 2, 3, 4 and 7,
// statistics, failures and timeouts, argument errors.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "conformance.h"
#include "parallm/comm/group_impl.h"
#include "parallm/comm/launch.h"
#include "parallm/comm/stats.h"

namespace parallm::comm {
namespace {

using testing::run_suite;

LaunchOptions local_options(double timeout_s = 60) {
  LaunchOptions o;
  o.backend = "local";
  o.timeout_s = timeout_s;
  return o;
}

class LocalConformance : public ::testing::TestWithParam<int> {};

TEST_P(LocalConformance, AllCollectivesAllAlgorithmsAllCounts) {
  std::atomic<int> ran{0};
  launch(GetParam(), local_options(), [&](Group world) {
    EXPECT_EQ(world.size(), GetParam());
    EXPECT_EQ(world.backend(), GetParam() == 1 ? "self" : "local");
    run_suite(world);
    ran.fetch_add(1);
  });
  EXPECT_EQ(ran.load(), GetParam());
}

TEST_P(LocalConformance, SplitSubGroups) {
  launch(GetParam(), local_options(), [&](Group world) { testing::check_split(world); });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, LocalConformance, ::testing::Values(1, 2, 3, 4, 7),
                         [](const auto& info) { return "p" + std::to_string(info.param); });

class LocalIntegerData : public ::testing::TestWithParam<int> {};

// i32 above 2^24, i64 above 2^53, u8: bit-exact through every copying collective and algorithm;
// reductions refuse them. (run_suite runs the same at 1, 2, 3, 4, 7; this adds 5, and a sub-group.)
TEST_P(LocalIntegerData, CopiedExactlyReductionsRefused) {
  launch(GetParam(), local_options(), [&](Group world) {
    testing::run_int_suite(world);
    Group sub = world.split(world.rank() % 2, world.rank(), "sub");
    testing::run_int_suite(sub);
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, LocalIntegerData, ::testing::Values(1, 2, 3, 4, 5),
                         [](const auto& info) { return "p" + std::to_string(info.param); });

TEST(LocalIntegerData, SuiteCatchesAnIdRoundedThroughF32) {
  // The check itself must fail when ids lose bits: an id above 2^24 through f32 does.
  const int32_t id = testing::int_value<int32_t>(0, 0);
  EXPECT_GT(id, 1 << 24);
  EXPECT_NE(static_cast<int32_t>(static_cast<float>(id)), id);
  const int64_t big = testing::int_value<int64_t>(3, 2);
  EXPECT_GT(big, int64_t(1) << 53);
  EXPECT_NE(static_cast<int64_t>(static_cast<double>(big)), big);
}

TEST(LocalGroup, ResultsAreBitwiseEqualOnAllRanks) {
  // Sums of values that round differently in different orders: every rank must still get the
  // same bits, whatever the algorithm.
  for (Algorithm a : {Algorithm::Native, Algorithm::Ring, Algorithm::RecursiveDoubling}) {
    std::vector<std::vector<float>> results(5);
    launch(5, local_options(), [&](Group g) {
      std::vector<float> x(testing::kSanitized ? 30000 : 300000);
      for (size_t i = 0; i < x.size(); ++i) x[i] = 1.0f / float(1 + (i * 7 + g.rank() * 13) % 101);
      g.all_reduce(x.data(), x.size(), DType::F32, ReduceOp::Sum, a);
      results[g.rank()] = x;
    });
    for (int r = 1; r < 5; ++r)
      ASSERT_EQ(0, std::memcmp(results[0].data(), results[r].data(), results[0].size() * 4))
          << algorithm_name(a) << " rank " << r;
  }
}

TEST(LocalGroup, BackToBackSmallAllReducesInConcurrentSubGroups) {
  // The small all-reduce syncs once and reads staging copies that alternate between two
  // generations: ranks that run one call ahead must never see a peer's next values. Three pairs
  // of ranks (more ranks than cores here) run many calls back to back with values that change
  // every call, and check every element of every result.
  const int kCalls = testing::kSanitized ? 300 : 3000;
  std::atomic<int> bad{0};
  launch(6, local_options(), [&](Group world) {
    Group pair = world.split(world.rank() / 2, world.rank());
    std::vector<float> x(4096);
    for (int call = 0; call < kCalls; ++call) {
      const size_t n = 1 + static_cast<size_t>(call * 997) % x.size();
      auto value = [&](int rank, size_t i) { return float((call * 31 + rank * 7 + i) % 1000); };
      for (size_t i = 0; i < n; ++i) x[i] = value(pair.rank(), i);
      pair.all_reduce(x.data(), n, DType::F32, ReduceOp::Sum);
      for (size_t i = 0; i < n; ++i)
        if (x[i] != value(0, i) + value(1, i)) {
          bad.fetch_add(1);
          break;
        }
      // The caller overwrites its buffer at once, as a model layer does.
      std::fill(x.begin(), x.end(), -1.0f);
    }
  });
  EXPECT_EQ(bad.load(), 0);
}

TEST(LocalGroup, PeersStillReadingWhenARankLeaves) {
  // A rank returns from the small all-reduce as soon as it has its result, and may drop its group
  // (and end) while a peer still reads its staging copy: the copy must outlive the rank's group.
  // (The copies once belonged to LocalGroup and went with it: a slow rank then summed freed
  // memory, and TP x PP runs on threads gave wrong tokens now and then.)
  for (int round = 0; round < 40; ++round) {
    std::atomic<int> bad{0};
    launch(2, local_options(), [&](Group world) {
      std::vector<float> x(16000, float(world.rank() + 1));
      {
        Group g = world.split(0, world.rank());
        g.all_reduce(x.data(), x.size(), DType::F32, ReduceOp::Sum);
      }  // rank 0 drops its group at once; rank 1 may still be summing
      for (float v : x)
        if (v != 3.0f) {
          bad.fetch_add(1);
          break;
        }
    });
    ASSERT_EQ(bad.load(), 0) << "round " << round;
  }
}

TEST(LocalGroup, DefaultGroupIsSizeOneNoOp) {
  Group g;
  EXPECT_EQ(g.size(), 1);
  EXPECT_EQ(g.rank(), 0);
  float x[3] = {1, 2, 3};
  g.all_reduce(x, 3);
  EXPECT_EQ(x[2], 3);
  float y[3] = {};
  g.all_gather(x, y, 3, DType::F32);
  EXPECT_EQ(y[1], 2);
  g.barrier();
  EXPECT_EQ(g.stats().count(Kind::AllReduce), 1u);
  EXPECT_EQ(g.stats().count(Kind::Barrier), 1u);
  EXPECT_EQ(g.stats().get(Kind::AllReduce).bytes_sent, 0u);
  Group s = g.split(3, 0, "tp");
  EXPECT_EQ(s.size(), 1);
  EXPECT_EQ(s.name(), "tp");
  EXPECT_THROW(g.send(x, 4, 0), std::invalid_argument);
}

TEST(LocalStats, CountsCallsAndBytesPerKind) {
  launch(4, local_options(), [&](Group g) {
    std::vector<float> x(1000, 1.0f);
    g.stats().reset();
    for (int i = 0; i < 3; ++i)
      g.all_reduce(x.data(), x.size(), DType::F32, ReduceOp::Sum, Algorithm::Ring);
    g.all_reduce(x.data(), x.size());
    g.barrier();
    const KindStats ar = g.stats().get(Kind::AllReduce);
    EXPECT_EQ(ar.calls, 4u);
    // Ring: 2(p-1)/p x N bytes each way per call (N = 4000 divisible by 4); native: the same.
    EXPECT_EQ(ar.bytes_sent, 4u * 2 * 3 * 1000);
    EXPECT_EQ(ar.bytes_recv, 4u * 2 * 3 * 1000);
    EXPECT_GT(ar.seconds, 0.0);
    EXPECT_EQ(g.stats().count(Kind::Barrier), 1u);
    EXPECT_EQ(g.stats().count(Kind::AllGather), 0u);
    // Point to point counts what this rank sent and received.
    if (g.rank() == 0) g.send(x.data(), 400, 1, 7);
    if (g.rank() == 1) g.recv(x.data(), 400, 0, 7);
    if (g.rank() == 0) {
      EXPECT_EQ(g.stats().get(Kind::Send).bytes_sent, 400u);
    }
    if (g.rank() == 1) {
      EXPECT_EQ(g.stats().get(Kind::Recv).bytes_recv, 400u);
    }
    g.stats().reset();
    EXPECT_EQ(g.stats().count(Kind::AllReduce), 0u);
  });
}

TEST(LocalStats, TablePerGroupNameAfterLaunch) {
  std::ostringstream out;
  LaunchOptions o = local_options();
  o.print_stats = true;
  o.stats_out = &out;
  launch(4, o, [&](Group world) {
    Group tp = world.split(world.rank() / 2, world.rank(), "tp");
    float x = 1;
    for (int i = 0; i < 5; ++i) tp.all_reduce(&x, 1);
    world.barrier();
  });
  const std::string table = out.str();
  EXPECT_NE(table.find("tp"), std::string::npos) << table;
  EXPECT_NE(table.find("all_reduce"), std::string::npos) << table;
  EXPECT_NE(table.find("barrier"), std::string::npos) << table;
  // 4 tp instances (2 groups x 2 ranks), 5 calls each.
  std::istringstream lines(table);
  std::string line;
  bool found = false;
  while (std::getline(lines, line)) {
    std::istringstream f(line);
    std::string name, kind;
    int inst = 0;
    double calls = 0;
    f >> name >> kind >> inst >> calls;
    if (name == "tp" && kind == "all_reduce") {
      found = true;
      EXPECT_EQ(inst, 4) << line;
      EXPECT_EQ(calls, 5.0) << line;
    }
  }
  EXPECT_TRUE(found) << table;
}

TEST(LocalFailure, ThrowingRankAbortsTheOthersWithItsMessage) {
  std::mutex mu;
  std::vector<std::string> others;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    launch(4, local_options(/*timeout_s=*/120), [&](Group g) {
      if (g.rank() == 1) throw std::runtime_error("weights file is truncated");
      try {
        float x = 1;
        g.all_reduce(&x, 1);
        g.barrier();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mu);
        others.push_back(e.what());
        throw;
      }
    });
    FAIL() << "launch did not rethrow";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "weights file is truncated");  // the original, unchanged
  }
  // Far below the timeout: the others were woken, not timed out.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
  ASSERT_EQ(others.size(), 3u);
  for (const std::string& m : others) {
    EXPECT_NE(m.find("rank 1 failed"), std::string::npos) << m;
    EXPECT_NE(m.find("weights file is truncated"), std::string::npos) << m;
  }
}

TEST(LocalFailure, FailureWhileOthersWaitInRecv) {
  EXPECT_THROW(launch(3, local_options(120),
                      [&](Group g) {
                        if (g.rank() == 2) {
                          std::this_thread::sleep_for(std::chrono::milliseconds(50));
                          throw std::invalid_argument("bad --tp");
                        }
                        char b[8];
                        g.recv(b, 8, 2, 0);  // never sent
                      }),
               std::invalid_argument);
}

TEST(LocalFailure, MissingRankTimesOut) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    launch(2, local_options(/*timeout_s=*/0.3), [&](Group g) {
      if (g.rank() == 0) g.barrier();  // rank 1 never arrives
    });
    FAIL() << "no timeout";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("timed out after 0.3 s"), std::string::npos) << m;
    EXPECT_NE(m.find("barrier"), std::string::npos) << m;
    EXPECT_NE(m.find("group \"world\""), std::string::npos) << m;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
}

TEST(LocalFailure, MismatchedMessageSizes) {
  EXPECT_THROW(launch(2, local_options(5),
                      [&](Group g) {
                        char b[16] = {};
                        if (g.rank() == 0) g.send(b, 16, 1, 3);
                        if (g.rank() == 1) g.recv(b, 8, 0, 3);
                      }),
               std::runtime_error);
}

TEST(LocalErrors, BadArgumentsNameTheValue) {
  auto message = [](auto&& fn) -> std::string {
    try {
      fn();
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(message([] {
              launch(0, local_options(), [](Group) {});
            }).find("world size must be >= 1, got 0"),
            std::string::npos);
  LaunchOptions bad = local_options();
  bad.backend = "nccl";
  EXPECT_NE(message([&] { launch(2, bad, [](Group) {}); }).find("\"nccl\""), std::string::npos);
  bad = local_options(-1);
  EXPECT_NE(message([&] { launch(2, bad, [](Group) {}); }).find("--comm-timeout"),
            std::string::npos);
  EXPECT_NE(
      message([] { parse_algorithm("tree", "--algo"); }).find("--algo: unknown algorithm \"tree\""),
      std::string::npos);

  std::mutex mu;
  std::vector<std::string> errors;
  launch(2, local_options(), [&](Group g) {
    float x[4] = {};
    auto record = [&](auto&& fn) {
      std::string m = message(fn);
      std::lock_guard<std::mutex> lock(mu);
      errors.push_back(m);
    };
    if (g.rank() != 0) return;
    record([&] { g.broadcast(x, 4, DType::F32, 2); });
    record([&] { g.send(x, 4, 5, 0); });
    record([&] { g.send(x, 4, 0, 0); });
    record([&] { g.send(x, 4, 1, -1); });
    record([&] { g.all_to_all(x, {1}, x, {1, 1}, DType::F32); });
    record([&] { g.all_reduce(nullptr, 4, DType::F32); });
    record([&] { g.split(-1, 0); });
  });
  ASSERT_EQ(errors.size(), 7u);
  EXPECT_NE(errors[0].find("root 2 is out of range [0, 2)"), std::string::npos) << errors[0];
  EXPECT_NE(errors[1].find("destination 5 is out of range"), std::string::npos) << errors[1];
  EXPECT_NE(errors[2].find("is this rank itself"), std::string::npos) << errors[2];
  EXPECT_NE(errors[3].find("tag -1"), std::string::npos) << errors[3];
  EXPECT_NE(errors[4].find("send_counts has 1 entries"), std::string::npos) << errors[4];
  EXPECT_NE(errors[5].find("data is null but count is 4"), std::string::npos) << errors[5];
  EXPECT_NE(errors[6].find("color must be >= 0, got -1"), std::string::npos) << errors[6];
}

TEST(Launch, NotUnderMpirunHere) {
  if (under_mpirun()) GTEST_SKIP() << "running under mpirun";
  EXPECT_EQ(launched_rank(), 0);
  EXPECT_EQ(launched_size(), 1);
}

// Sets an environment variable for one scope, restoring the old value (or its absence).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(Launch, RanksOnThisNode) {
  if (under_mpirun()) GTEST_SKIP() << "running under mpirun";
  // Threads: all ranks of the run are on this machine.
  EXPECT_EQ(ranks_on_this_node(6), 6);
  {
    // Open MPI: 8 processes, 3 of them here.
    ScopedEnv size("OMPI_COMM_WORLD_SIZE", "8");
    ScopedEnv local("OMPI_COMM_WORLD_LOCAL_SIZE", "3");
    EXPECT_EQ(ranks_on_this_node(8), 3);
  }
  {
    // MPICH hydra: MPI_LOCALNRANKS.
    ScopedEnv size("PMI_SIZE", "4");
    ScopedEnv local("MPI_LOCALNRANKS", "2");
    EXPECT_EQ(ranks_on_this_node(4), 2);
  }
  {
    // Under mpirun with no local count: assume one per node rather than all.
    ScopedEnv size("PMI_SIZE", "4");
    ScopedEnv bad("PMI_LOCAL_SIZE", "zero");
    EXPECT_EQ(ranks_on_this_node(4), 1);
  }
  EXPECT_EQ(ranks_on_this_node(2), 2);  // the environment is restored
}

TEST(Launch, GatherStringsAtAnyRoot) {
  for (int p = 1; p <= 5; ++p) {
    for (int root : {0, p - 1}) {
      std::mutex mu;
      std::vector<std::vector<std::string>> got(p);
      // Rank r's string: r x 37 bytes (rank 0 empty) with NULs and quotes, and its rank.
      auto text = [](int r) {
        std::string s;
        for (int i = 0; i < r * 37; ++i) s.push_back(static_cast<char>((r * 31 + i) % 256));
        return s + "\"rank " + std::to_string(r) + "\"\n";
      };
      launch(p, local_options(), [&](Group world) {
        // A message with the same peer and a small tag in flight around it must not be taken.
        const int next = (world.rank() + 1) % p, prev = (world.rank() - 1 + p) % p;
        int64_t token = world.rank();
        if (p > 1) world.send(&token, sizeof token, next, 0);
        std::vector<std::string> all = gather_strings(world, text(world.rank()), root);
        if (p > 1) {
          world.recv(&token, sizeof token, prev, 0);
          EXPECT_EQ(token, prev);
        }
        std::lock_guard<std::mutex> lock(mu);
        got[world.rank()] = std::move(all);
      });
      for (int r = 0; r < p; ++r) {
        if (r != root) {
          EXPECT_TRUE(got[r].empty()) << "p " << p << " rank " << r;
          continue;
        }
        ASSERT_EQ(got[r].size(), size_t(p)) << "p " << p;
        for (int q = 0; q < p; ++q) EXPECT_EQ(got[r][q], text(q)) << "p " << p << " from " << q;
      }
    }
  }
  try {
    launch(1, local_options(), [](Group world) { gather_strings(world, "x", 1); });
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("root 1 is out of range [0, 1)"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace parallm::comm
