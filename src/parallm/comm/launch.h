// launch: starts the ranks of a run and hands each its world Group.
//
//   comm::launch(tp * pp * dp, {.backend = "auto", .timeout_s = 300}, [&](comm::Group world) {
//     comm::Mesh mesh(world, {.tp = tp, .pp = pp, .dp = dp});
//     ...
//   });
//
// "auto": under mpirun (OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK in the environment) MPI is
// initialised, its world size must equal world_size, and fn runs once in this process with the MPI
// world group; otherwise fn runs on world_size threads (rank 0 on the calling thread), each with
// its local-backend world group.
//
// Failure: on the local backend the first exception in any rank makes every other rank's blocking
// comm call throw (naming the failing rank and carrying its message); launch joins all threads and
// rethrows the first, original exception. Under MPI, an exception in fn prints
// "[comm] MPI rank R of P failed: <message>" and aborts the whole job (MPI_Abort). Every blocking
// call gives up after timeout_s.
#pragma once

#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

#include "parallm/comm/group.h"

namespace parallm::comm {

struct LaunchOptions {
  std::string backend = "auto";  // "auto", "local" or "mpi"
  double timeout_s = 300;        // --comm-timeout
  Algorithm algorithm = Algorithm::Auto;
  bool print_stats = false;           // --comm-stats: print the table after fn returns (rank 0)
  std::ostream* stats_out = nullptr;  // where; stderr when null
};

void launch(int world_size, const LaunchOptions& options,
            const std::function<void(Group world)>& fn);

// Whether this process was started by mpirun / mpiexec (Open MPI, MPICH hydra or PMIx).
bool under_mpirun();
// This process's rank under mpirun (from the environment, before MPI is initialised), else 0. For
// printing once per job; inside fn prefer world.rank() == 0.
int launched_rank();
// The number of processes mpirun started, else 1.
int launched_size();
// How many ranks of this run share this machine (to split its cores between them): under mpirun,
// the processes it started on this node (OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS or
// PMI_LOCAL_SIZE; 1 if none is set); otherwise all `world_size` ranks, which are threads of this
// process.
int ranks_on_this_node(int world_size);

// Collective over `group`: every rank passes one string (any bytes, any length, each rank its
// own); `root` gets all of them, index = rank, and the others an empty vector. Two collectives
// (an all-gather of the lengths, an all-to-all of the bytes), no point-to-point tags, so it cannot
// match a message of the caller's.
std::vector<std::string> gather_strings(const Group& group, const std::string& mine, int root = 0);

}  // namespace parallm::comm
