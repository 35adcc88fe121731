#include "parallm/comm/local/local_group.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "parallm/comm/algorithms/reduce.h"
#include "parallm/core/error.h"

namespace parallm::comm::local {

using algorithms::block_begin;
using algorithms::reduce_f32;
using algorithms::reduce_into_f32;
using algorithms::reduce_n_f32;

LocalGroup::LocalGroup(std::shared_ptr<LocalWorld> world, std::vector<int> world_ranks, int rank,
                       uint64_t ctx, std::shared_ptr<CommStats> stats, CommOptions options)
    : GroupImpl(rank, static_cast<int>(world_ranks.size()), world_ranks[rank], std::move(stats),
                options, world->registry()),
      world_(std::move(world)),
      world_ranks_(std::move(world_ranks)),
      ctx_(ctx),
      shared_(world_->shared(ctx, size_)) {}

std::shared_ptr<GroupImpl> make_world_group(std::shared_ptr<LocalWorld> world, int rank,
                                            CommOptions options) {
  std::vector<int> ranks(world->size());
  std::iota(ranks.begin(), ranks.end(), 0);
  auto stats = world->registry()->make("world", world->size(), rank);
  return std::make_shared<LocalGroup>(std::move(world), std::move(ranks), rank, 0, std::move(stats),
                                      options);
}

void LocalGroup::sync() {
  GroupShared& s = *shared_;
  const uint64_t gen = s.generation.load(std::memory_order_acquire);
  if (s.arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<uint64_t>(size_)) {
    s.arrived.store(0, std::memory_order_relaxed);
    s.generation.store(gen + 1, std::memory_order_release);
    world_->notify();
    return;
  }
  wait([&] { return s.generation.load(std::memory_order_acquire) != gen; },
       [&] { return describe() + ", waiting for the other ranks of the group"; });
}

// ---- point to point ------------------------------------------------------------------------

void LocalGroup::send(const void* data, size_t bytes, int dst, int tag) {
  world_->send(ctx_, world_rank_, world_ranks_[dst], tag, data, bytes);
}

void LocalGroup::p2p_recv(uint64_t ctx, void* data, size_t bytes, int src, int tag) {
  PostedRecv pr{ctx, world_ranks_[src], tag, data, bytes};
  world_->post_recv(world_rank_, pr);
  world_->wait_recv(world_rank_, pr, deadline(), options_.timeout_s,
                    [&] { return cat(describe(), ", receiving from rank ", src, " tag ", tag); });
}

void LocalGroup::recv(void* data, size_t bytes, int src, int tag) {
  p2p_recv(ctx_, data, bytes, src, tag);
}

void LocalGroup::do_coll_send(const void* data, size_t bytes, int dst) {
  world_->send(ctx_ + 1, world_rank_, world_ranks_[dst], 0, data, bytes);
}

void LocalGroup::do_coll_recv(void* data, size_t bytes, int src) {
  p2p_recv(ctx_ + 1, data, bytes, src, 0);
}

void LocalGroup::do_coll_sendrecv(const void* send, size_t send_bytes, int dst, void* recv,
                                  size_t recv_bytes, int src) {
  // Post the receive first so that our peer's send can copy straight into it.
  PostedRecv pr{ctx_ + 1, world_ranks_[src], 0, recv, recv_bytes};
  world_->post_recv(world_rank_, pr);
  try {
    world_->send(ctx_ + 1, world_rank_, world_ranks_[dst], 0, send, send_bytes);
  } catch (...) {
    world_->withdraw(world_rank_, pr);
    throw;
  }
  world_->wait_recv(world_rank_, pr, deadline(), options_.timeout_s,
                    [&] { return cat(describe(), ", receiving from rank ", src); });
}

// ---- collectives through shared memory -----------------------------------------------------

void LocalGroup::native_all_reduce(void* data, size_t count, DType dtype, ReduceOp op) {
  GroupShared& s = *shared_;
  const int p = size_, r = rank_;
  const size_t elem = dtype_size(dtype);
  char* out = static_cast<char*>(data);
  thread_local std::vector<float> acc;
  if (count * elem <= kReadAllMaxBytes) {
    // One sync. Each rank copies its input to a staging buffer, syncs, and sums all staging
    // buffers in rank order straight into its output (so all get bitwise the same result). The
    // output may be written at once, since peers read only the staging copies. Two generations of
    // staging buffers take turns: a rank writes generation g again two small all-reduces later,
    // after the sync of the one in between, which no rank passes before every rank has finished
    // reading generation g. The buffers belong to the group's shared state, not to this rank's
    // LocalGroup: a peer may still be reading ours after we have returned, even after our rank
    // has finished and dropped its groups.
    const int g = static_cast<int>(small_reduces_++ & 1);
    std::unique_ptr<float[]>& mine = s.slots[r].staging[g];
    if (!mine) mine = std::make_unique<float[]>(kReadAllMaxBytes / sizeof(float));
    std::memcpy(mine.get(), data, count * elem);
    sync();
    thread_local std::vector<const float*> in;
    in.resize(p);
    for (int q = 0; q < p; ++q) in[q] = s.slots[q].staging[g].get();
    if (dtype == DType::F32) {
      reduce_n_f32(static_cast<float*>(data), in.data(), p, count, op);
      return;
    }
    acc.resize(count);
    convert(in[0], dtype, acc.data(), DType::F32, count);
    for (int q = 1; q < p; ++q) reduce_into_f32(acc.data(), in[q], dtype, count, op);
    convert(acc.data(), DType::F32, data, dtype, count);
    return;
  }
  s.slots[r].send = data;
  sync();
  // Reduce-scatter: this rank reduces block r into its own buffer (only it reads block r of its
  // buffer in this phase), then all-gather: copy every other block from its owner.
  const size_t b = block_begin(count, p, r), e = block_begin(count, p, r + 1);
  if (dtype == DType::F32) {
    float* mine = static_cast<float*>(data) + b;
    for (int q = 0; q < p; ++q)
      if (q != r) reduce_f32(mine, static_cast<const float*>(s.slots[q].send) + b, e - b, op);
  } else {
    acc.resize(e - b);
    convert(out + b * elem, dtype, acc.data(), DType::F32, e - b);
    for (int q = 0; q < p; ++q)
      if (q != r)
        reduce_into_f32(acc.data(), static_cast<const char*>(s.slots[q].send) + b * elem, dtype,
                        e - b, op);
    convert(acc.data(), DType::F32, out + b * elem, dtype, e - b);
  }
  sync();
  for (int q = 0; q < p; ++q) {
    if (q == r) continue;
    const size_t qb = block_begin(count, p, q), qe = block_begin(count, p, q + 1);
    std::memcpy(out + qb * elem, static_cast<const char*>(s.slots[q].send) + qb * elem,
                (qe - qb) * elem);
  }
  sync();  // our blocks have been copied out; the caller may change the buffer again
}

void LocalGroup::native_all_gather(const void* send, void* recv, size_t count, DType dtype) {
  GroupShared& s = *shared_;
  const size_t bytes = count * dtype_size(dtype);
  s.slots[rank_].send = send;
  sync();
  for (int q = 0; q < size_; ++q) {
    char* dst = static_cast<char*>(recv) + q * bytes;
    if (dst != s.slots[q].send) std::memcpy(dst, s.slots[q].send, bytes);
  }
  sync();
}

void LocalGroup::native_reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                                       ReduceOp op) {
  GroupShared& s = *shared_;
  const size_t offset = rank_ * count * dtype_size(dtype);
  s.slots[rank_].send = send;
  sync();
  thread_local std::vector<float> acc;
  acc.resize(count);
  convert(static_cast<const char*>(s.slots[0].send) + offset, dtype, acc.data(), DType::F32, count);
  for (int q = 1; q < size_; ++q)
    reduce_into_f32(acc.data(), static_cast<const char*>(s.slots[q].send) + offset, dtype, count,
                    op);
  sync();  // written after the sync, so recv may overlap send
  convert(acc.data(), DType::F32, recv, dtype, count);
}

void LocalGroup::native_all_to_all(const void* send, const size_t* send_counts, void* recv,
                                   const size_t* recv_counts, DType dtype) {
  GroupShared& s = *shared_;
  const size_t elem = dtype_size(dtype);
  s.slots[rank_].send = send;
  s.slots[rank_].counts = send_counts;
  sync();
  size_t recv_off = 0;
  for (int q = 0; q < size_; ++q) {
    const size_t* counts = s.slots[q].counts;
    size_t off = 0;
    for (int k = 0; k < rank_; ++k) off += counts[k];
    if (counts[rank_] != recv_counts[q])
      fail<std::runtime_error>("comm", describe(), ": rank ", q, " sends ", counts[rank_],
                               " elements but recv_counts[", q, "] is ", recv_counts[q]);
    if (counts[rank_] > 0)
      std::memcpy(static_cast<char*>(recv) + recv_off * elem,
                  static_cast<const char*>(s.slots[q].send) + off * elem, counts[rank_] * elem);
    recv_off += recv_counts[q];
  }
  sync();
}

void LocalGroup::native_broadcast(void* data, size_t count, DType dtype, int root) {
  GroupShared& s = *shared_;
  s.slots[rank_].send = data;
  sync();
  if (rank_ != root) std::memcpy(data, s.slots[root].send, count * dtype_size(dtype));
  sync();
}

std::shared_ptr<GroupImpl> LocalGroup::split(int color, int key) {
  // Gather (color, key) from everyone.
  int64_t mine[2] = {color, key};
  std::vector<int64_t> all(2 * size_);
  native_all_gather(mine, all.data(), 2, DType::I64);
  uint64_t base = 0;
  if (rank_ == 0) base = world_->new_contexts(2 * static_cast<uint64_t>(size_));
  native_broadcast(&base, 1, DType::I64, 0);

  std::vector<int> members;  // parent ranks with our color, ordered by (key, parent rank)
  for (int q = 0; q < size_; ++q)
    if (all[2 * q] == color) members.push_back(q);
  std::stable_sort(members.begin(), members.end(),
                   [&](int a, int b) { return all[2 * a + 1] < all[2 * b + 1]; });
  std::vector<int> ranks;
  int new_rank = 0, lowest = size_;
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i] == rank_) new_rank = static_cast<int>(i);
    lowest = std::min(lowest, members[i]);
    ranks.push_back(world_ranks_[members[i]]);
  }
  // Each new group's context ids are unique: base + 2 x (its lowest parent rank).
  const uint64_t ctx = base + 2 * static_cast<uint64_t>(lowest);
  auto stats = new_stats("split", static_cast<int>(ranks.size()));
  if (ranks.size() == 1) return make_self_group(std::move(stats), options_, world_rank_, registry_);
  return std::make_shared<LocalGroup>(world_, std::move(ranks), new_rank, ctx, std::move(stats),
                                      options_);
}

Algorithm LocalGroup::choose(Kind kind, size_t bytes) const {
  // Shared memory reads peers' buffers directly; the algorithms over send/recv copy every message
  // through a mailbox. bench comm shows native ahead at every size (docs/benchmarks.md).
  return Algorithm::Native;
}

}  // namespace parallm::comm::local
