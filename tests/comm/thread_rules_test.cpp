// Thread rules of Group: one owner thread per group, and what a watchdog on another thread may
// read (InFlight's snapshot). CI runs this binary under ThreadSanitizer (.ci/run, "comm tests under
// TSan"), where the watchdog tests check the timeout path for data races: the MPI backend's
// watchdog is this same Watchdog over the same InFlight.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallm/comm/group_impl.h"
#include "parallm/comm/in_flight.h"
#include "parallm/comm/launch.h"

namespace parallm::comm {
namespace {

using namespace std::chrono_literals;

LaunchOptions local_options(double timeout_s = 60) {
  LaunchOptions o;
  o.backend = "local";
  o.timeout_s = timeout_s;
  return o;
}

// Polls `pred` for up to `limit`.
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = 10000ms) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return pred();
}

TEST(InFlight, SnapshotOfTheCallInProgress) {
  InFlight f(1, 3, 4, "tp");
  EXPECT_FALSE(f.snapshot());
  f.begin(Kind::Recv, 10.0, 12.5, /*peer=*/2, /*tag=*/7);
  auto s = f.snapshot();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->call, 1u);
  EXPECT_EQ(s->kind, Kind::Recv);
  EXPECT_EQ(s->timeout_s(), 2.5);
  EXPECT_EQ(s->describe(), "rank 1 of group \"tp\" (size 3, world rank 4) in recv from rank 2 tag 7");
  EXPECT_FALSE(f.overdue(12.4));
  EXPECT_TRUE(f.overdue(12.5));
  f.end();
  EXPECT_FALSE(f.snapshot());
  EXPECT_FALSE(f.overdue(1e9));
  f.set_name("pp");
  f.begin(Kind::Barrier, 20.0, 21.0);
  s = f.snapshot();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->call, 2u);
  EXPECT_EQ(s->describe(), "rank 1 of group \"pp\" (size 3, world rank 4) in barrier");
}

TEST(InFlight, ReaderNeverSeesAMixOfTwoCalls) {
  // The owner thread publishes calls whose fields agree with each other (peer == tag == call % 97,
  // kind and deadline from the call number) as fast as it can; a reader checks every snapshot it
  // gets. A snapshot mixing two calls fails here; a data race fails under TSan.
  InFlight f(0, 2, 0, "world");
  std::atomic<bool> done{false};
  std::atomic<uint64_t> seen{0}, bad{0};
  std::thread reader([&] {
    while (!done.load(std::memory_order_relaxed)) {
      auto s = f.snapshot();
      if (!s) continue;
      seen.fetch_add(1, std::memory_order_relaxed);
      const int m = static_cast<int>(s->call % 97);
      if (s->peer != m || s->tag != m || s->kind != static_cast<Kind>(s->call % kKindCount) ||
          s->start_s != double(s->call) || s->deadline_s != double(s->call) + m)
        bad.fetch_add(1, std::memory_order_relaxed);
    }
  });
  const uint64_t calls = 200000;
  for (uint64_t c = 1; c <= calls; ++c) {
    const int m = static_cast<int>(c % 97);
    f.begin(static_cast<Kind>(c % kKindCount), double(c), double(c) + m, m, m);
    if (c % 1000 == 0) f.set_name("world" + std::to_string(c));
    f.end();
  }
  // Leave the last call in flight until the reader has seen it, so it has seen at least one.
  f.begin(static_cast<Kind>((calls + 1) % kKindCount), double(calls + 1),
          double(calls + 1) + double((calls + 1) % 97), int((calls + 1) % 97),
          int((calls + 1) % 97));
  EXPECT_TRUE(eventually([&] { return seen.load() > 0; }));
  done = true;
  reader.join();
  EXPECT_EQ(bad.load(), 0u) << "of " << seen.load() << " snapshots";
}

TEST(Watchdog, ReportsAStuckCallOnceAndNotTheOnesThatEnded) {
  std::mutex mu;
  std::vector<InFlight::Snapshot> reported;
  InFlight quick(0, 2, 0, "world"), stuck(1, 2, 1, "tp");
  {
    Watchdog dog(
        [&](const InFlight::Snapshot& s) {
          std::lock_guard<std::mutex> lock(mu);
          reported.push_back(s);
        },
        /*period_s=*/0.002);
    dog.add(&quick);
    dog.add(&stuck);
    // The "rank thread": many calls that end well before their deadline, and one that hangs (as
    // a blocking MPI call whose peer never comes).
    std::thread rank([&] {
      for (int i = 0; i < 2000; ++i) {
        const double now = now_seconds();
        quick.begin(Kind::AllReduce, now, now + 60);
        quick.end();
      }
      const double now = now_seconds();
      stuck.begin(Kind::Recv, now, now + 0.05, /*peer=*/0, /*tag=*/9);
      std::this_thread::sleep_for(300ms);  // stuck past the deadline, seen several times
      stuck.end();
    });
    rank.join();
    dog.remove(&quick);
    dog.remove(&stuck);
  }
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_EQ(reported[0].describe(),
            "rank 1 of group \"tp\" (size 2, world rank 1) in recv from rank 0 tag 9");
  EXPECT_NEAR(reported[0].timeout_s(), 0.05, 1e-6);
}

// The watchdog over real groups of the local backend: rank 0 waits in a barrier that rank 1 joins
// only after the watchdog has reported rank 0's call. The watchdog's clock is moved ahead while
// rank 0 waits (the local backend's own timeout, on the rank thread, stays far away), so the
// report comes from the watchdog thread reading rank 0's InFlight while the rank threads write
// theirs.
TEST(Watchdog, SeesALocalRankWaitingInABarrier) {
  std::atomic<double> skew{0};
  std::mutex mu;
  std::vector<std::string> reported;
  std::atomic<const InFlight*> rank0{nullptr};
  Watchdog dog(
      [&](const InFlight::Snapshot& s) {
        std::lock_guard<std::mutex> lock(mu);
        reported.push_back(s.describe() + " after " + std::to_string(int(s.timeout_s())) + " s");
      },
      /*period_s=*/0.002, [&] { return now_seconds() + skew.load(); });
  launch(2, local_options(/*timeout_s=*/100), [&](Group world) {
    Group tp = world.split(0, world.rank(), "tp");
    dog.add(&tp.impl()->in_flight());
    // Traffic while the watchdog reads: no call is near its deadline.
    for (int i = 0; i < 200; ++i) {
      float x = 1;
      tp.all_reduce(&x, 1);
    }
    if (world.rank() == 0) {
      rank0 = &tp.impl()->in_flight();
      tp.barrier();
    } else {
      // Wait until rank 0 is in the barrier, then let the watchdog's clock pass its deadline.
      EXPECT_TRUE(eventually([&] {
        const InFlight* f = rank0.load();
        auto s = f ? f->snapshot() : std::nullopt;
        return s && s->kind == Kind::Barrier;
      }));
      skew = 1000;
      EXPECT_TRUE(eventually([&] {
        std::lock_guard<std::mutex> lock(mu);
        return !reported.empty();
      }));
      skew = 0;
      tp.barrier();
    }
    world.barrier();  // both ranks stop using tp before either removes it
    dog.remove(&tp.impl()->in_flight());
  });
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_EQ(reported[0], "rank 0 of group \"tp\" (size 2, world rank 0) in barrier after 100 s");
}

TEST(GroupOwner, AnotherThreadIsRefusedNamingTheGroup) {
  // check_owner is compiled in every build; Group calls it on every call where NDEBUG is unset.
  launch(2, local_options(), [&](Group world) {
    Group tp = world.split(0, world.rank(), "tp");
    tp.impl()->check_owner(Kind::Barrier);  // this thread: the first caller, so the owner
    tp.impl()->check_owner(Kind::Barrier);
    std::string error;
    std::thread other([&] {
      try {
        tp.impl()->check_owner(Kind::AllReduce);
      } catch (const std::logic_error& e) {
        error = e.what();
      }
    });
    other.join();
    EXPECT_NE(error.find("called all_reduce on group \"tp\" (rank " + std::to_string(tp.rank()) +
                         " of 2, world rank " + std::to_string(world.rank()) +
                         "), which belongs to thread"),
              std::string::npos)
        << error;
    world.barrier();
  });
}

TEST(GroupOwner, CollectiveFromASecondThreadFailsInDebugBuilds) {
#if defined(NDEBUG) && !defined(PARALLM_CHECK_GROUP_OWNER)
  GTEST_SKIP() << "the owner check runs in builds without NDEBUG";
#else
  // A size-1 group: the call itself needs no peer, so only the owner check can stop it.
  Group g;
  g.set_name("solo");
  float x = 1;
  g.all_reduce(&x, 1);  // this thread owns g now
  std::string error;
  std::thread other([&] {
    try {
      g.all_reduce(&x, 1);
    } catch (const std::logic_error& e) {
      error = e.what();
    }
  });
  other.join();
  EXPECT_NE(error.find("called all_reduce on group \"solo\""), std::string::npos) << error;
  g.barrier();  // the owner still may
#endif
}

}  // namespace
}  // namespace parallm::comm
