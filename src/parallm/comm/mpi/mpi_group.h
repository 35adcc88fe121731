// The MPI backend: one process per rank, started by mpirun (Open MPI or MPICH; only MPI-3 standard
// calls are used). MPI is initialised once per process with MPI_THREAD_MULTIPLE and finalized at
// exit. Blocking MPI calls cannot time out, so a watchdog thread checks the deadline of the call in
// progress and, past it, prints which rank and call hung and aborts the whole job.
#pragma once

#include <memory>

#include "parallm/comm/group_impl.h"

namespace parallm::comm::mpi {

// Initialises MPI if nobody has (idempotent); it is finalized exactly once at process exit.
void ensure_initialized();
int world_rank();  // MPI_COMM_WORLD rank and size; initialise first
int world_size();
// A duplicate of MPI_COMM_WORLD, named "world".
std::shared_ptr<GroupImpl> make_world_group(CommOptions options,
                                            std::shared_ptr<StatsRegistry> registry);
// Prints `message` on stderr and ends the whole job (MPI_Abort on MPI_COMM_WORLD).
[[noreturn]] void abort_job(const std::string& message, int code = 1);

}  // namespace parallm::comm::mpi
