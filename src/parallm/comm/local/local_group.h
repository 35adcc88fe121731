// The local backend: ranks are threads of one process and exchange through shared memory.
// Collectives publish a pointer to their buffer, sync, and read the peers' buffers directly
// (no copies through the mailboxes); send/recv go through LocalWorld's mailboxes.
#pragma once

#include <memory>
#include <vector>

#include "parallm/comm/group_impl.h"
#include "parallm/comm/local/local_world.h"

namespace parallm::comm::local {

class LocalGroup final : public GroupImpl {
 public:
  // world_ranks[i]: the world rank of this group's rank i. ctx: the group's first context id.
  LocalGroup(std::shared_ptr<LocalWorld> world, std::vector<int> world_ranks, int rank,
             uint64_t ctx, std::shared_ptr<CommStats> stats, CommOptions options);

  std::string_view backend() const override { return "local"; }

  void send(const void* data, size_t bytes, int dst, int tag) override;
  void recv(void* data, size_t bytes, int src, int tag) override;

  void native_all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override;
  void native_all_gather(const void* send, void* recv, size_t count, DType dtype) override;
  void native_reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                             ReduceOp op) override;
  void native_all_to_all(const void* send, const size_t* send_counts, void* recv,
                         const size_t* recv_counts, DType dtype) override;
  void native_broadcast(void* data, size_t count, DType dtype, int root) override;
  void barrier() override { sync(); }
  std::shared_ptr<GroupImpl> split(int color, int key) override;
  Algorithm choose(Kind kind, size_t bytes) const override;

  // Up to this many bytes, all-reduce copies the input to a staging buffer and reads every peer's
  // whole staging buffer (1 sync); above, each rank reduces one block of the peers' buffers and
  // then gathers the others' blocks (3 syncs, 1/p of the reads).
  static constexpr size_t kReadAllMaxBytes = 64 << 10;

 protected:
  void do_coll_send(const void* data, size_t bytes, int dst) override;
  void do_coll_recv(void* data, size_t bytes, int src) override;
  void do_coll_sendrecv(const void* send, size_t send_bytes, int dst, void* recv, size_t recv_bytes,
                        int src) override;

 private:
  void sync();  // all ranks of the group arrive before any leaves
  void p2p_recv(uint64_t ctx, void* data, size_t bytes, int src, int tag);
  template <class Describe>
  void wait(const auto& pred, Describe&& describe) {
    world_->wait(pred, deadline(), options_.timeout_s, describe);
  }

  std::shared_ptr<LocalWorld> world_;
  std::vector<int> world_ranks_;
  uint64_t ctx_;  // ctx_: user send/recv; ctx_ + 1: algorithm traffic
  std::shared_ptr<GroupShared> shared_;
  uint64_t small_reduces_ = 0;  // small all-reduces so far: picks the staging generation
};

// The world group of rank `rank` of a local launch.
std::shared_ptr<GroupImpl> make_world_group(std::shared_ptr<LocalWorld> world, int rank,
                                            CommOptions options);

}  // namespace parallm::comm::local
