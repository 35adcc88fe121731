#include "parallm/comm/launch.h"

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include "parallm/comm/group_impl.h"
#include "parallm/comm/local/local_group.h"
#include "parallm/comm/stats.h"
#include "parallm/core/error.h"
#if PARALLM_HAVE_MPI
#include "parallm/comm/mpi/mpi_group.h"
#endif

namespace parallm::comm {
namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  return end && *end == '\0' ? static_cast<int>(x) : fallback;
}

void print_table(const LaunchOptions& options, const std::shared_ptr<StatsRegistry>& registry) {
  std::ostream& out = options.stats_out ? *options.stats_out : std::cerr;
  print_stats_table(out, registry->all());
}

void launch_local(int world_size, const LaunchOptions& options, const CommOptions& copts,
                  const std::function<void(Group)>& fn) {
  if (world_size == 1) {
    auto registry = std::make_shared<StatsRegistry>();
    {
      Group world(make_self_group(registry->make("world", 1, 0), copts, 0, registry));
      fn(world);
    }
    if (options.print_stats) print_table(options, registry);
    return;
  }
  auto world = std::make_shared<local::LocalWorld>(world_size);
  std::mutex mu;
  std::exception_ptr first;
  auto run_rank = [&](int rank) {
    try {
      Group g(local::make_world_group(world, rank, copts));
      fn(g);
    } catch (const local::Aborted&) {
      // A consequence of another rank's failure, which launch rethrows instead.
    } catch (const std::exception& e) {
      if (world->abort(rank, e.what())) {
        std::lock_guard<std::mutex> lock(mu);
        first = std::current_exception();
      }
    } catch (...) {
      if (world->abort(rank, "unknown exception")) {
        std::lock_guard<std::mutex> lock(mu);
        first = std::current_exception();
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(world_size - 1);
  try {
    for (int r = 1; r < world_size; ++r) threads.emplace_back(run_rank, r);
  } catch (const std::exception& e) {
    world->abort(0, cat("could not start rank thread ", threads.size() + 1, ": ", e.what()));
    for (auto& t : threads) t.join();
    throw;
  }
  run_rank(0);
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
  if (options.print_stats) print_table(options, world->registry());
}

}  // namespace

bool under_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

int launched_rank() {
  if (!under_mpirun()) return 0;
  return env_int("OMPI_COMM_WORLD_RANK", env_int("PMI_RANK", env_int("PMIX_RANK", 0)));
}

int launched_size() {
  if (!under_mpirun()) return 1;
  return env_int("OMPI_COMM_WORLD_SIZE", env_int("PMI_SIZE", 1));
}

int ranks_on_this_node(int world_size) {
  if (!under_mpirun()) return world_size;
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"}) {
    const int n = env_int(var, 0);
    if (n > 0) return n;
  }
  return 1;
}

std::vector<std::string> gather_strings(const Group& group, const std::string& mine, int root) {
  const int p = group.size(), r = group.rank();
  if (root < 0 || root >= p)
    fail("comm", "gather_strings on group \"", group.name(), "\" (size ", p, "): root ", root,
         " is out of range [0, ", p, ")");
  // Lengths to every rank (all_to_all needs them only at the root, but the all-gather is one call).
  const int64_t my_len = static_cast<int64_t>(mine.size());
  std::vector<int64_t> lens(p);
  group.all_gather(&my_len, lens.data(), 1, DType::I64);
  // Each rank sends its bytes to the root only; the root receives lens[q] from rank q.
  std::vector<size_t> send_counts(p, 0), recv_counts(p, 0);
  send_counts[root] = mine.size();
  if (r == root)
    for (int q = 0; q < p; ++q) recv_counts[q] = static_cast<size_t>(lens[q]);
  else
    recv_counts[r] = send_counts[r];  // 0: a rank sends itself nothing but at the root
  std::string all;
  if (r == root) {
    size_t total = 0;
    for (size_t n : recv_counts) total += n;
    all.resize(total);
  }
  group.all_to_all(mine.data(), send_counts, all.data(), recv_counts, DType::U8);
  if (r != root) return {};
  std::vector<std::string> out(p);
  size_t off = 0;
  for (int q = 0; q < p; ++q) {
    out[q] = all.substr(off, recv_counts[q]);
    off += recv_counts[q];
  }
  return out;
}

void launch(int world_size, const LaunchOptions& options, const std::function<void(Group)>& fn) {
  if (world_size < 1) fail("comm", "launch: world size must be >= 1, got ", world_size);
  if (!(options.timeout_s > 0))
    fail("comm", "--comm-timeout must be > 0 seconds, got ", options.timeout_s);
  const std::string& b = options.backend;
  if (b != "auto" && b != "local" && b != "mpi")
    fail("comm", "--comm-backend: unknown backend \"", b, "\" (expected auto, local or mpi)");
  CommOptions copts;
  copts.timeout_s = options.timeout_s;
  copts.algorithm = options.algorithm;

  const bool use_mpi = b == "mpi" || (b == "auto" && under_mpirun());
  if (!use_mpi) {
    launch_local(world_size, options, copts, fn);
    return;
  }
#if PARALLM_HAVE_MPI
  mpi::ensure_initialized();
  const int mpi_size = mpi::world_size(), mpi_rank = mpi::world_rank();
  if (mpi_size != world_size)
    fail("comm", "mpirun started ", mpi_size, " processes but this run needs ", world_size,
         " ranks (tp x pp x dp); start it with mpirun -np ", world_size);
  auto registry = std::make_shared<StatsRegistry>();
  try {
    Group world(mpi::make_world_group(copts, registry));
    fn(world);
  } catch (const std::exception& e) {
    // The other ranks may be blocked in MPI calls that only an abort can end.
    mpi::abort_job(cat("[comm] MPI rank ", mpi_rank, " of ", mpi_size, " failed: ", e.what()));
  }
  if (options.print_stats && mpi_rank == 0) print_table(options, registry);
#else
  fail<std::runtime_error>("comm", "backend \"mpi\" was asked for",
                           under_mpirun() ? " (this process runs under mpirun)" : "",
                           " but parallm was built without MPI (configure with -DPARALLM_MPI=ON "
                           "after apt-get install libopenmpi-dev)");
#endif
}

}  // namespace parallm::comm
