// GroupImpl: what a backend provides under a Group handle. A backend gives
//  - a byte transport for the algorithms in comm/algorithms/ (coll_send/coll_recv/coll_sendrecv, on
//    a channel of its own so that user tags never collide with algorithm traffic),
//  - user point-to-point (send/recv with tags),
//  - its native collectives (native_*), a barrier and split.
// Group (group.cpp) validates arguments, takes the size-1 fast path, picks the algorithm, and
// keeps the statistics; a GroupImpl may assume its arguments are valid and size() > 1.
//
// One GroupImpl object belongs to one rank (the local backend makes one per rank thread, with the
// state the ranks share held apart) and to one thread of it, its owner: the first thread that
// calls through it. Its plain members need no locking. Builds without NDEBUG check the owner on
// every call (a second thread calling a collective gets std::logic_error naming the group); the
// one thing other threads read, what is in flight (a watchdog's view), is published through
// InFlight's atomics.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "parallm/comm/group.h"
#include "parallm/comm/in_flight.h"
#include "parallm/comm/stats.h"

namespace parallm::comm {

class GroupImpl {
 public:
  // registry: where the statistics of this group's sub-groups are listed (may be null).
  GroupImpl(int rank, int size, int world_rank, std::shared_ptr<CommStats> stats,
            CommOptions options, std::shared_ptr<StatsRegistry> registry = nullptr)
      : rank_(rank),
        size_(size),
        world_rank_(world_rank),
        stats_(std::move(stats)),
        options_(options),
        registry_(std::move(registry)),
        in_flight_(rank, size, world_rank, stats_->name()) {}
  virtual ~GroupImpl() = default;
  GroupImpl(const GroupImpl&) = delete;
  GroupImpl& operator=(const GroupImpl&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int world_rank() const { return world_rank_; }
  const std::string& name() const { return stats_->name(); }
  void set_name(std::string name) {
    in_flight_.set_name(name);
    stats_->set_name(std::move(name));
  }
  CommStats& stats() { return *stats_; }
  const std::shared_ptr<CommStats>& stats_ptr() const { return stats_; }
  const CommOptions& options() const { return options_; }
  const std::shared_ptr<StatsRegistry>& registry() const { return registry_; }
  // Statistics for a new group of this launch (listed in the registry when there is one).
  std::shared_ptr<CommStats> new_stats(std::string name, int size) const {
    return registry_ ? registry_->make(std::move(name), size, world_rank_)
                     : std::make_shared<CommStats>(std::move(name), size, world_rank_);
  }
  void set_options(const CommOptions& o) { options_ = o; }
  virtual std::string_view backend() const = 0;

  // Bracket every call made through Group: check the owner thread (builds without NDEBUG), publish
  // the call in in_flight(), and set the deadline (options().timeout_s from now); peer and tag for
  // send/recv. Then the backend's begin_op / end_op.
  void start_op(Kind kind, int peer = -1, int tag = -1) {
#if !defined(NDEBUG) || defined(PARALLM_CHECK_GROUP_OWNER)
    check_owner(kind);
#endif
    current_kind_ = kind;
    const double now = now_seconds();
    deadline_ = now + options_.timeout_s;
    in_flight_.begin(kind, now, deadline_, peer, tag);
    begin_op(kind);
  }
  void finish_op() {
    end_op();
    in_flight_.end();
  }
  Kind current_kind() const { return current_kind_; }
  // When the call in progress gives up (seconds on now_seconds()'s clock).
  double deadline() const { return deadline_; }
  // What this group has in flight, for a watchdog on another thread.
  const InFlight& in_flight() const { return in_flight_; }

  // Throws std::logic_error naming the group and `kind` unless the calling thread is this group's
  // owner (the first thread that called check_owner). start_op calls it in builds without
  // NDEBUG; always compiled, so that tests of every build can call it.
  void check_owner(Kind kind);
  // "rank 1 of group "tp" (size 2, world rank 3) in all_reduce": for error messages.
  std::string describe() const;

  // The algorithms' transport. Counts the bytes (read back by Group for the statistics).
  void coll_send(const void* data, size_t bytes, int dst) {
    sent_ += bytes;
    do_coll_send(data, bytes, dst);
  }
  void coll_recv(void* data, size_t bytes, int src) {
    recv_ += bytes;
    do_coll_recv(data, bytes, src);
  }
  // Sends to dst and receives from src at the same time (no deadlock around a ring).
  void coll_sendrecv(const void* send, size_t send_bytes, int dst, void* recv, size_t recv_bytes,
                     int src) {
    sent_ += send_bytes;
    recv_ += recv_bytes;
    do_coll_sendrecv(send, send_bytes, dst, recv, recv_bytes, src);
  }
  uint64_t bytes_sent() const { return sent_; }
  uint64_t bytes_recv() const { return recv_; }

  // User point to point, tags in [0, kMaxTag].
  virtual void send(const void* data, size_t bytes, int dst, int tag) = 0;
  virtual void recv(void* data, size_t bytes, int src, int tag) = 0;

  // Native collectives; same contracts as Group's.
  virtual void native_all_reduce(void* data, size_t count, DType dtype, ReduceOp op) = 0;
  virtual void native_all_gather(const void* send, void* recv, size_t count, DType dtype) = 0;
  virtual void native_reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                                     ReduceOp op) = 0;
  virtual void native_all_to_all(const void* send, const size_t* send_counts, void* recv,
                                 const size_t* recv_counts, DType dtype) = 0;
  virtual void native_broadcast(void* data, size_t count, DType dtype, int root) = 0;
  virtual void barrier() = 0;
  virtual std::shared_ptr<GroupImpl> split(int color, int key) = 0;
  // Whether every rank of the group runs on this rank's machine (collective; see Group). The
  // threads backend's ranks always do.
  virtual bool one_machine() {
    return true;
  }

  // The algorithm Auto means for this backend, kind and message size (bytes per rank).
  virtual Algorithm choose(Kind kind, size_t bytes) const = 0;

 protected:
  virtual void do_coll_send(const void* data, size_t bytes, int dst) = 0;
  virtual void do_coll_recv(void* data, size_t bytes, int src) = 0;
  virtual void do_coll_sendrecv(const void* send, size_t send_bytes, int dst, void* recv,
                                size_t recv_bytes, int src) = 0;

  int rank_;
  int size_;
  int world_rank_;
  std::shared_ptr<CommStats> stats_;
  CommOptions options_;
  std::shared_ptr<StatsRegistry> registry_;
  Kind current_kind_ = Kind::Barrier;
  uint64_t sent_ = 0, recv_ = 0;

 private:
  // Hooks for the backends, inside start_op / finish_op.
  virtual void begin_op(Kind) {}
  virtual void end_op() {}

  double deadline_ = 0;
  InFlight in_flight_;
  std::atomic<std::thread::id> owner_{};  // default id: no owner yet
};

constexpr int kMaxTag = 32767;  // the smallest MPI_TAG_UB the MPI standard allows

// The size-1 group (Group()): every call is a no-op or a copy; Group never calls it otherwise.
std::shared_ptr<GroupImpl> make_self_group(std::shared_ptr<CommStats> stats, CommOptions options,
                                           int world_rank = 0,
                                           std::shared_ptr<StatsRegistry> registry = nullptr);

}  // namespace parallm::comm
