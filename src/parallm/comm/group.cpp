// Group: argument checks, the size-1 fast path, algorithm choice and statistics, in front of a
// backend's GroupImpl.
#include "parallm/comm/group.h"

#include <cstring>
#include <sstream>
#include <thread>

#include "parallm/comm/algorithms/algorithms.h"
#include "parallm/comm/group_impl.h"
#include "parallm/comm/stats.h"
#include "parallm/core/error.h"

namespace parallm::comm {

std::string_view algorithm_name(Algorithm algo) {
  switch (algo) {
    case Algorithm::Auto:
      return "auto";
    case Algorithm::Native:
      return "native";
    case Algorithm::Ring:
      return "ring";
    case Algorithm::RecursiveDoubling:
      return "rd";
  }
  return "?";
}

Algorithm parse_algorithm(std::string_view text, std::string_view what) {
  if (text == "auto") return Algorithm::Auto;
  if (text == "native") return Algorithm::Native;
  if (text == "ring") return Algorithm::Ring;
  if (text == "rd" || text == "recursive_doubling") return Algorithm::RecursiveDoubling;
  fail("comm", what, ": unknown algorithm \"", text, "\" (expected auto, native, ring or rd)");
}

std::string GroupImpl::describe() const {
  return cat("rank ", rank_, " of group \"", name(), "\" (size ", size_, ", world rank ",
             world_rank_, ") in ", kind_name(current_kind_));
}

void GroupImpl::check_owner(Kind kind) {
  const std::thread::id me = std::this_thread::get_id();
  std::thread::id owner{};
  // The first caller becomes the owner; later calls only compare.
  if (owner_.compare_exchange_strong(owner, me, std::memory_order_relaxed) || owner == me) return;
  std::ostringstream ids;
  ids << "thread " << me << " called " << kind_name(kind) << " on group \"" << name()
      << "\" (rank " << rank_ << " of " << size_ << ", world rank " << world_rank_
      << "), which belongs to thread " << owner;
  fail<std::logic_error>("comm", ids.str(),
                         ": a Group is used by one thread only (the first that calls it); give "
                         "another thread its own group (split), or hand it work through a queue");
}

namespace {

// The size-1 group: Group handles it before reaching here, except for split.
class SelfImpl final : public GroupImpl {
 public:
  using GroupImpl::GroupImpl;
  std::string_view backend() const override { return "self"; }
  void send(const void*, size_t, int, int) override { unreachable(); }
  void recv(void*, size_t, int, int) override { unreachable(); }
  void native_all_reduce(void*, size_t, DType, ReduceOp) override {}
  void native_all_gather(const void*, void*, size_t, DType) override { unreachable(); }
  void native_reduce_scatter(const void*, void*, size_t, DType, ReduceOp) override {
    unreachable();
  }
  void native_all_to_all(const void*, const size_t*, void*, const size_t*, DType) override {
    unreachable();
  }
  void native_broadcast(void*, size_t, DType, int) override {}
  void barrier() override {}
  std::shared_ptr<GroupImpl> split(int, int) override {
    return make_self_group(new_stats("split", 1), options_, world_rank_, registry_);
  }
  Algorithm choose(Kind, size_t) const override { return Algorithm::Native; }

 protected:
  void do_coll_send(const void*, size_t, int) override { unreachable(); }
  void do_coll_recv(void*, size_t, int) override { unreachable(); }
  void do_coll_sendrecv(const void*, size_t, int, void*, size_t, int) override { unreachable(); }

 private:
  [[noreturn]] static void unreachable() {
    fail<std::logic_error>("comm", "internal: size-1 group reached its transport");
  }
};

// Brackets one call: arms the backend's timeout, measures time and bytes, and records them in the
// group's statistics if the call returns normally.
class OpScope {
 public:
  // peer, tag: of a send or recv (-1: none), for the watchdog's message.
  OpScope(GroupImpl& g, Kind kind, int peer = -1, int tag = -1)
      : g_(g), kind_(kind), sent0_(g.bytes_sent()), recv0_(g.bytes_recv()), t0_(now_seconds()) {
    g_.start_op(kind, peer, tag);
  }
  ~OpScope() { g_.finish_op(); }
  // Bytes moved by a native collective (the algorithms count theirs through the transport).
  void add_bytes(uint64_t sent, uint64_t recv) {
    extra_sent_ += sent;
    extra_recv_ += recv;
  }
  void done() {
    g_.stats().record(kind_, g_.bytes_sent() - sent0_ + extra_sent_,
                      g_.bytes_recv() - recv0_ + extra_recv_, now_seconds() - t0_);
  }

 private:
  GroupImpl& g_;
  Kind kind_;
  uint64_t sent0_, recv0_;
  uint64_t extra_sent_ = 0, extra_recv_ = 0;
  double t0_;
};

void check_buffer(const void* p, size_t count, const GroupImpl& g, const char* call,
                  const char* what) {
  if (p == nullptr && count > 0)
    fail("comm", call, " on group \"", g.name(), "\": ", what, " is null but count is ", count);
}

// Integer dtypes are copy-only (core/dtype.h): a sum of token ids is never meant, and a reduction
// through f32 would round ids above 2^24.
void check_reducible(DType dtype, const GroupImpl& g, const char* call) {
  if (!is_float(dtype))
    fail("comm", call, " on group \"", g.name(), "\": dtype ", dtype_name(dtype),
         " cannot be reduced (integer dtypes are copy-only: all_gather, broadcast, all_to_all and "
         "send/recv carry them; reductions take f32, bf16 or f16)");
}

void check_peer(int peer, const GroupImpl& g, const char* call, const char* what) {
  if (peer < 0 || peer >= g.size())
    fail("comm", call, " on group \"", g.name(), "\" (size ", g.size(), "): ", what, " ", peer,
         " is out of range [0, ", g.size(), ")");
  if (peer == g.rank())
    fail("comm", call, " on group \"", g.name(), "\": ", what, " ", peer,
         " is this rank itself (send/recv need another rank)");
}

Algorithm resolve(const GroupImpl& g, Algorithm algo, Kind kind, size_t bytes) {
  if (algo == Algorithm::Auto) algo = g.options().algorithm;
  if (algo == Algorithm::Auto) algo = g.choose(kind, bytes);
  return algo;
}

}  // namespace

std::shared_ptr<GroupImpl> make_self_group(std::shared_ptr<CommStats> stats, CommOptions options,
                                           int world_rank,
                                           std::shared_ptr<StatsRegistry> registry) {
  return std::make_shared<SelfImpl>(0, 1, world_rank, std::move(stats), options,
                                    std::move(registry));
}

Group::Group() : impl_(make_self_group(std::make_shared<CommStats>("self", 1, 0), CommOptions{})) {}
Group::Group(std::shared_ptr<GroupImpl> impl) : impl_(std::move(impl)) {
  if (!impl_) fail("comm", "Group: null GroupImpl");
}

int Group::rank() const {
  return impl_->rank();
}
int Group::size() const {
  return impl_->size();
}
const std::string& Group::name() const {
  return impl_->name();
}
CommStats& Group::stats() const {
  return impl_->stats();
}
void Group::set_name(std::string name) const {
  impl_->set_name(std::move(name));
}
const CommOptions& Group::options() const {
  return impl_->options();
}
void Group::set_options(const CommOptions& options) const {
  if (!(options.timeout_s > 0))
    fail("comm", "group \"", name(), "\": timeout must be > 0 seconds, got ", options.timeout_s);
  impl_->set_options(options);
}
std::string_view Group::backend() const {
  return impl_->backend();
}
int Group::world_rank() const {
  return impl_->world_rank();
}

void Group::all_reduce(void* data, size_t count, DType dtype, ReduceOp op, Algorithm algo) const {
  GroupImpl& g = *impl_;
  check_buffer(data, count, g, "all_reduce", "data");
  check_reducible(dtype, g, "all_reduce");
  OpScope scope(g, Kind::AllReduce);
  const size_t bytes = count * dtype_size(dtype);
  if (g.size() > 1 && count > 0) {
    switch (resolve(g, algo, Kind::AllReduce, bytes)) {
      case Algorithm::Ring:
        algorithms::ring_all_reduce(g, data, count, dtype, op);
        break;
      case Algorithm::RecursiveDoubling:
        algorithms::rd_all_reduce(g, data, count, dtype, op);
        break;
      default: {
        g.native_all_reduce(data, count, dtype, op);
        const uint64_t v = 2 * (g.size() - 1) * (bytes / g.size());
        scope.add_bytes(v, v);
      }
    }
  }
  scope.done();
}

void Group::all_gather(const void* send, void* recv, size_t count, DType dtype,
                       Algorithm algo) const {
  GroupImpl& g = *impl_;
  check_buffer(send, count, g, "all_gather", "send");
  check_buffer(recv, count, g, "all_gather", "recv");
  OpScope scope(g, Kind::AllGather);
  const size_t bytes = count * dtype_size(dtype);
  if (g.size() == 1) {
    if (send != recv && bytes > 0) std::memmove(recv, send, bytes);
  } else if (count > 0) {
    switch (resolve(g, algo, Kind::AllGather, bytes * g.size())) {
      case Algorithm::Ring:
        algorithms::ring_all_gather(g, send, recv, count, dtype);
        break;
      case Algorithm::RecursiveDoubling:
        algorithms::bruck_all_gather(g, send, recv, count, dtype);
        break;
      default: {
        g.native_all_gather(send, recv, count, dtype);
        const uint64_t v = (g.size() - 1) * bytes;
        scope.add_bytes(v, v);
      }
    }
  }
  scope.done();
}

void Group::reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                           Algorithm algo) const {
  GroupImpl& g = *impl_;
  check_buffer(send, count, g, "reduce_scatter", "send");
  check_buffer(recv, count, g, "reduce_scatter", "recv");
  check_reducible(dtype, g, "reduce_scatter");
  OpScope scope(g, Kind::ReduceScatter);
  const size_t bytes = count * dtype_size(dtype);
  if (g.size() == 1) {
    if (send != recv && bytes > 0) std::memmove(recv, send, bytes);
  } else if (count > 0) {
    switch (resolve(g, algo, Kind::ReduceScatter, bytes * g.size())) {
      case Algorithm::Ring:
        algorithms::ring_reduce_scatter(g, send, recv, count, dtype, op);
        break;
      case Algorithm::RecursiveDoubling:
        algorithms::rd_reduce_scatter(g, send, recv, count, dtype, op);
        break;
      default: {
        g.native_reduce_scatter(send, recv, count, dtype, op);
        const uint64_t v = (g.size() - 1) * bytes;
        scope.add_bytes(v, v);
      }
    }
  }
  scope.done();
}

void Group::all_to_all(const void* send, const std::vector<size_t>& send_counts, void* recv,
                       const std::vector<size_t>& recv_counts, DType dtype) const {
  GroupImpl& g = *impl_;
  const size_t p = g.size();
  if (send_counts.size() != p || recv_counts.size() != p)
    fail("comm", "all_to_all on group \"", g.name(), "\" (size ", p, "): send_counts has ",
         send_counts.size(), " entries and recv_counts ", recv_counts.size(), "; both need ", p);
  size_t send_total = 0, recv_total = 0;
  for (size_t i = 0; i < p; ++i) {
    send_total += send_counts[i];
    recv_total += recv_counts[i];
  }
  check_buffer(send, send_total, g, "all_to_all", "send");
  check_buffer(recv, recv_total, g, "all_to_all", "recv");
  const int r = g.rank();
  if (send_counts[r] != recv_counts[r])
    fail("comm", "all_to_all on group \"", g.name(), "\": rank ", r, " sends itself ",
         send_counts[r], " elements but expects ", recv_counts[r]);
  OpScope scope(g, Kind::AllToAll);
  const size_t elem = dtype_size(dtype);
  if (p == 1) {
    if (send != recv && send_total > 0) std::memmove(recv, send, send_total * elem);
  } else {
    // Per-rank counts differ between ranks, so the choice must not depend on them: only the
    // backend's own default is used (native, or pairwise when forced through options).
    if (g.options().algorithm == Algorithm::Ring ||
        g.options().algorithm == Algorithm::RecursiveDoubling) {
      algorithms::pairwise_all_to_all(g, send, send_counts.data(), recv, recv_counts.data(), dtype);
    } else {
      g.native_all_to_all(send, send_counts.data(), recv, recv_counts.data(), dtype);
      scope.add_bytes((send_total - send_counts[r]) * elem, (recv_total - recv_counts[r]) * elem);
    }
  }
  scope.done();
}

void Group::broadcast(void* data, size_t count, DType dtype, int root) const {
  GroupImpl& g = *impl_;
  if (root < 0 || root >= g.size())
    fail("comm", "broadcast on group \"", g.name(), "\" (size ", g.size(), "): root ", root,
         " is out of range [0, ", g.size(), ")");
  check_buffer(data, count, g, "broadcast", "data");
  OpScope scope(g, Kind::Broadcast);
  const size_t bytes = count * dtype_size(dtype);
  if (g.size() > 1 && count > 0) {
    if (g.options().algorithm == Algorithm::Ring ||
        g.options().algorithm == Algorithm::RecursiveDoubling) {
      algorithms::binomial_broadcast(g, data, count, dtype, root);
    } else {
      g.native_broadcast(data, count, dtype, root);
      if (g.rank() == root)
        scope.add_bytes(bytes, 0);
      else
        scope.add_bytes(0, bytes);
    }
  }
  scope.done();
}

void Group::send(const void* data, size_t bytes, int dst, int tag) const {
  GroupImpl& g = *impl_;
  check_peer(dst, g, "send", "destination");
  check_buffer(data, bytes, g, "send", "data");
  if (tag < 0 || tag > kMaxTag)
    fail("comm", "send on group \"", g.name(), "\": tag ", tag, " is out of range [0, ", kMaxTag,
         "]");
  OpScope scope(g, Kind::Send, dst, tag);
  g.send(data, bytes, dst, tag);
  scope.add_bytes(bytes, 0);
  scope.done();
}

void Group::recv(void* data, size_t bytes, int src, int tag) const {
  GroupImpl& g = *impl_;
  check_peer(src, g, "recv", "source");
  check_buffer(data, bytes, g, "recv", "data");
  if (tag < 0 || tag > kMaxTag)
    fail("comm", "recv on group \"", g.name(), "\": tag ", tag, " is out of range [0, ", kMaxTag,
         "]");
  OpScope scope(g, Kind::Recv, src, tag);
  g.recv(data, bytes, src, tag);
  scope.add_bytes(0, bytes);
  scope.done();
}

void Group::barrier() const {
  GroupImpl& g = *impl_;
  OpScope scope(g, Kind::Barrier);
  if (g.size() > 1) g.barrier();
  scope.done();
}

bool Group::on_one_machine() const {
  if (size() == 1) return true;
  GroupImpl& g = *impl_;
  OpScope scope(g, Kind::Split);
  const bool one = g.one_machine();
  scope.done();
  return one;
}

Group Group::split(int color, int key) const {
  if (color < 0) fail("comm", "split on group \"", name(), "\": color must be >= 0, got ", color);
  GroupImpl& g = *impl_;
  OpScope scope(g, Kind::Split);
  std::shared_ptr<GroupImpl> sub = g.split(color, key);
  sub->set_options(g.options());
  scope.done();
  return Group(std::move(sub));
}

Group Group::split(int color, int key, std::string name) const {
  Group sub = split(color, key);
  sub.set_name(std::move(name));
  return sub;
}

}  // namespace parallm::comm
