// The MPI backend, run by ctest under mpirun (tests/comm/tests.cmake) at 2, 3, 4 and 7 processes.
// Without mpirun (gtest discovery, plain ctest entries) these tests skip.
#include <gtest/gtest.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "conformance.h"
#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"

namespace parallm::comm {
namespace {

LaunchOptions mpi_options(double timeout_s) {
  LaunchOptions o;
  o.backend = "mpi";
  o.timeout_s = timeout_s;
  return o;
}

#define SKIP_UNLESS_MPIRUN() \
  if (!under_mpirun()) GTEST_SKIP() << "needs mpirun (see tests/comm/tests.cmake)"

TEST(MpiConformance, AllCollectivesAllAlgorithmsAllCounts) {
  SKIP_UNLESS_MPIRUN();
  launch(launched_size(), mpi_options(120), [&](Group world) {
    EXPECT_EQ(world.backend(), "mpi");
    EXPECT_EQ(world.rank(), launched_rank());
    testing::run_suite(world);
  });
}

TEST(MpiConformance, SplitAndMesh) {
  SKIP_UNLESS_MPIRUN();
  launch(launched_size(), mpi_options(120), [&](Group world) {
    testing::check_split(world);
    // TP over as many ranks as divide the world evenly by 2, else a pure pipeline.
    const int p = world.size();
    const MeshShape shape = p % 2 == 0 ? MeshShape{.tp = 2, .dp = p / 2} : MeshShape{.pp = p};
    Mesh mesh(world, shape);
    const MeshLayout want = mesh_layout(p, shape);
    float mine = float(world.rank());
    std::vector<float> got(mesh.tp().size());
    mesh.tp().all_gather(&mine, got.data(), 1, DType::F32);
    for (const auto& l : want.tp) {
      if (std::find(l.begin(), l.end(), world.rank()) == l.end()) continue;
      for (size_t i = 0; i < l.size(); ++i) EXPECT_EQ(got[i], float(l[i]));
    }
    EXPECT_EQ(mesh.pp().name(), "pp");
  });
}

TEST(MpiConformance, GatherStringsAndRanksOnThisNode) {
  SKIP_UNLESS_MPIRUN();
  launch(launched_size(), mpi_options(120), [&](Group world) {
    const int p = world.size();
    auto text = [](int r) { return "rank " + std::to_string(r) + std::string(r * 1000, char(r)); };
    for (int root : {0, p - 1}) {
      const std::vector<std::string> all = gather_strings(world, text(world.rank()), root);
      if (world.rank() != root) {
        EXPECT_TRUE(all.empty());
        continue;
      }
      ASSERT_EQ(all.size(), size_t(p));
      for (int q = 0; q < p; ++q) EXPECT_EQ(all[q], text(q)) << "from rank " << q;
    }
    // Every process of these tests runs on this machine; Open MPI says how many exactly.
    const int here = ranks_on_this_node(p);
    if (std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE"))
      EXPECT_EQ(here, p);
    else
      EXPECT_TRUE(here >= 1 && here <= p) << here;
  });
}

TEST(MpiConformance, WorldSizeMismatchIsAClearError) {
  SKIP_UNLESS_MPIRUN();
  try {
    launch(launched_size() + 1, mpi_options(10), [](Group) {});
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("mpirun started " + std::to_string(launched_size()) +
                                         " processes but this run needs " +
                                         std::to_string(launched_size() + 1)),
              std::string::npos)
        << e.what();
  }
}

// The failure tests end the job on purpose; tests.cmake checks the output for the message.
TEST(MpiFailure, RankThrows) {
  SKIP_UNLESS_MPIRUN();
  launch(launched_size(), mpi_options(30), [](Group world) {
    if (world.rank() == 1) throw std::runtime_error("injected failure on rank 1");
    float x = 1;
    world.all_reduce(&x, 1);
  });
}

TEST(MpiFailure, RankExits) {
  SKIP_UNLESS_MPIRUN();
  launch(launched_size(), mpi_options(30), [](Group world) {
    if (world.rank() == 1) _exit(3);
    float x = 1;
    world.all_reduce(&x, 1);
  });
}

// PARALLM_MPI_WAIT: a rank kept waiting 300 ms in a recv and then in a barrier spins through the
// wait (MPI's blocking calls: about a core's worth of CPU time) or sleeps through it (sleep: the
// CPU time of polls every ~20-70 us, under a fifth of the wait). ctest runs it once each way.
TEST(MpiWait, AWaitingRankSpinsOrSleepsAsAsked) {
  SKIP_UNLESS_MPIRUN();
  const char* env = std::getenv("PARALLM_MPI_WAIT");
  const std::string mode = env ? env : "";
  if (mode != "spin" && mode != "sleep") GTEST_SKIP() << "run with PARALLM_MPI_WAIT=spin|sleep";
  auto cpu_s = [] {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
  };
  launch(launched_size(), mpi_options(60), [&](Group world) {
    constexpr auto kWait = std::chrono::milliseconds(300);
    for (const bool collective : {false, true}) {
      world.barrier();
      if (world.rank() == 1) {
        std::this_thread::sleep_for(kWait);
        float x = 1;
        if (collective)
          world.barrier();
        else
          world.send(&x, sizeof x, 0, 7);
        continue;
      }
      if (world.rank() != 0) {
        if (collective) world.barrier();
        continue;
      }
      const double c0 = cpu_s();
      const auto t0 = std::chrono::steady_clock::now();
      float x = 0;
      if (collective)
        world.barrier();
      else
        world.recv(&x, sizeof x, 1, 7);
      const double wall =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double cpu = cpu_s() - c0;
      EXPECT_GE(wall, 0.25);
      if (mode == "sleep")
        EXPECT_LT(cpu, 0.2 * wall)
            << (collective ? "barrier" : "recv") << ": " << cpu << " s of CPU in " << wall << " s";
      else
        EXPECT_GT(cpu, 0.3 * wall)
            << (collective ? "barrier" : "recv") << ": " << cpu << " s of CPU in " << wall << " s";
    }
  });
}

TEST(MpiFailure, RankHangs) {
  SKIP_UNLESS_MPIRUN();
  launch(launched_size(), mpi_options(1), [](Group world) {
    if (world.rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(60));
    world.barrier();
  });
}

}  // namespace
}  // namespace parallm::comm
