// Group: a cheap, copyable handle to a set of ranks that talk to each other, over a GroupImpl (one
// per backend: local threads, MPI). The code above comm/ sees only this handle and cannot tell the
// backends apart. A default-constructed Group is the size-1 group: every collective on it is a
// no-op (or a copy), never an error.
//
// Data types: the copying calls (all_gather, broadcast, all_to_all; send/recv move bytes) carry
// every dtype bit-exactly, the integer ones (i32, i64, u8: token and candidate ids) included. The
// reductions (all_reduce, reduce_scatter) take f32, bf16 and f16 only and throw
// std::invalid_argument naming the call and the dtype for an integer one.
//
// Threads: a Group (all copies of one handle) belongs to one thread, the first that calls through
// it; builds without NDEBUG throw std::logic_error naming the group when another thread calls.
// Ranks that are threads each have their own Group; a second thread of a rank needs its own group
// (split). What a group has in flight is published for watchdogs through atomics (InFlight).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "parallm/core/dtype.h"

namespace parallm::comm {

enum class ReduceOp { Sum, Max };

// Which algorithm a collective uses. Auto picks per message size (see comm/algorithms/).
// Native: the backend's own collective (MPI_Allreduce; the local backend's shared-memory path).
// Ring / RecursiveDoubling: comm/algorithms/, written once over send/recv, on any backend.
enum class Algorithm { Auto, Native, Ring, RecursiveDoubling };
std::string_view algorithm_name(Algorithm algo);  // "auto", "native", "ring", "rd"
// Accepts "auto", "native", "ring", "rd" / "recursive_doubling"; throws naming `what` otherwise.
Algorithm parse_algorithm(std::string_view text, std::string_view what = "algorithm");

// Per-group options; split() hands them to the sub-groups.
struct CommOptions {
  Algorithm algorithm = Algorithm::Auto;  // used where a call passes Algorithm::Auto
  double timeout_s = 300;  // every blocking call gives up after this long (--comm-timeout)
};

class CommStats;
class GroupImpl;

class Group {
 public:
  Group();  // the size-1 group
  explicit Group(std::shared_ptr<GroupImpl> impl);

  int rank() const;
  int size() const;
  const std::string& name() const;  // e.g. "world", "tp", "pp"; set by the mesh, shown in stats

  // In place over `count` elements. bf16 reduces with f32 accumulation. Float dtypes only.
  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op = ReduceOp::Sum,
                  Algorithm algo = Algorithm::Auto) const;
  void all_reduce(float* data, size_t count, ReduceOp op = ReduceOp::Sum) const {
    all_reduce(data, count, DType::F32, op);
  }
  // send: `count` elements; recv: size() * count elements, rank r's block at r * count.
  void all_gather(const void* send, void* recv, size_t count, DType dtype,
                  Algorithm algo = Algorithm::Auto) const;
  // send: size() * count elements; recv: this rank's reduced block of `count`. Float dtypes only.
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                      ReduceOp op = ReduceOp::Sum, Algorithm algo = Algorithm::Auto) const;
  // send_counts[r] elements go to rank r (blocks packed in rank order); recv_counts[r] come from r.
  void all_to_all(const void* send, const std::vector<size_t>& send_counts, void* recv,
                  const std::vector<size_t>& recv_counts, DType dtype) const;
  void broadcast(void* data, size_t count, DType dtype, int root) const;
  // Point to point, tagged (0 <= tag <= 32767): a recv matches the oldest send with the same
  // (source, tag). send never waits for the matching recv (the bytes are delivered into a recv
  // already posted, or copied and queued), so stages may send to each other in any order; recv
  // blocks until its message arrives (or the timeout). The sizes must match.
  void send(const void* data, size_t bytes, int dst, int tag = 0) const;
  void recv(void* data, size_t bytes, int src, int tag = 0) const;
  void barrier() const;

  // Ranks with the same color form a new group, ordered by (key, old rank).
  Group split(int color, int key) const;

  // Same, and names the new group (shown in stats and errors).
  Group split(int color, int key, std::string name) const;

  // Whether all ranks of the group run on one machine, sharing its memory (MPI: the launcher's
  // node, as MPI_Comm_split_type's shared-memory split sees it; an emulated cluster's namespaces
  // are nodes; the threads backend: always). Collective over the group; the size-1 group: true.
  bool on_one_machine() const;

  // Call counts, bytes and time per kind of call, for this group as seen by this rank.
  CommStats& stats() const;

  // Handle operations (not collective): they change this rank's view of the group only.
  void set_name(std::string name) const;
  const CommOptions& options() const;
  void set_options(const CommOptions& options) const;
  std::string_view backend() const;  // "self", "local" or "mpi"
  int world_rank() const;            // this rank in the launch's world group

  const std::shared_ptr<GroupImpl>& impl() const { return impl_; }

 private:
  std::shared_ptr<GroupImpl> impl_;
};

}  // namespace parallm::comm
