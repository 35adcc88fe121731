// CommStats: per group, per kind of call, how many calls, how many bytes this rank sent and
// received, and how long the calls took. Counters are relaxed atomics, so they cost a few
// nanoseconds per call and stay on in production; later checks ("exactly two all-reduces per layer
// per decode step", the planner's predicted bytes) read them.
//
// Bytes are what this rank put on / took off the wire. For algorithms over send/recv
// (comm/algorithms/) they are counted exactly; for a backend's native collective (MPI_Allreduce,
// the local backend's shared-memory path) they are the bandwidth-optimal volume of that collective
// (all-reduce: 2(p-1)/p x N each way), since the library does not tell us what it moved.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace parallm::comm {

enum class Kind {
  AllReduce,
  AllGather,
  ReduceScatter,
  AllToAll,
  Broadcast,
  Send,
  Recv,
  Barrier,
  Split,
};
constexpr int kKindCount = 9;
std::string_view kind_name(Kind kind);  // "all_reduce", "send", ...

struct KindStats {
  uint64_t calls = 0;
  uint64_t bytes_sent = 0;
  uint64_t bytes_recv = 0;
  double seconds = 0;
};

class CommStats {
 public:
  explicit CommStats(std::string group_name = "self", int group_size = 1, int world_rank = 0)
      : name_(std::move(group_name)), group_size_(group_size), world_rank_(world_rank) {}
  CommStats(const CommStats&) = delete;
  CommStats& operator=(const CommStats&) = delete;

  void record(Kind kind, uint64_t bytes_sent, uint64_t bytes_recv, double seconds) {
    Counters& c = counters_[static_cast<int>(kind)];
    c.calls.fetch_add(1, std::memory_order_relaxed);
    c.bytes_sent.fetch_add(bytes_sent, std::memory_order_relaxed);
    c.bytes_recv.fetch_add(bytes_recv, std::memory_order_relaxed);
    c.nanos.fetch_add(static_cast<uint64_t>(seconds * 1e9), std::memory_order_relaxed);
  }

  uint64_t count(Kind kind) const {
    return counters_[static_cast<int>(kind)].calls.load(std::memory_order_relaxed);
  }
  KindStats get(Kind kind) const;
  KindStats total() const;  // all kinds summed
  void reset();

  const std::string& name() const { return name_; }
  void set_name(std::string name) { name_ = std::move(name); }
  int group_size() const { return group_size_; }
  int world_rank() const { return world_rank_; }  // rank in the launch's world, for tables

  // One line per kind that was called: kind, calls, bytes sent/received, seconds.
  void print(std::ostream& out) const;

 private:
  struct Counters {
    std::atomic<uint64_t> calls{0}, bytes_sent{0}, bytes_recv{0}, nanos{0};
  };
  std::array<Counters, kKindCount> counters_;
  std::string name_;  // written only by the owning rank (Group::set_name), read after it is done
  int group_size_;
  int world_rank_;
};

// Every CommStats made during one launch (all ranks of the local backend, or this process under
// MPI), so that a table can be printed after the groups themselves are gone.
class StatsRegistry {
 public:
  std::shared_ptr<CommStats> make(std::string group_name, int group_size, int world_rank);
  std::vector<std::shared_ptr<CommStats>> all() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<CommStats>> stats_;
};

// The table printed by --comm-stats: one row per (group name, kind), summed over the group
// instances of that name (e.g. all TP groups of all ranks). Columns: instances (rank-groups seen),
// calls per instance, MB sent and received per instance, total seconds per instance and the
// resulting GB/s.
void print_stats_table(std::ostream& out, const std::vector<std::shared_ptr<CommStats>>& stats);

}  // namespace parallm::comm
