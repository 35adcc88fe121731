// Data parallelism over the flat gradient buffer of a ParamStore (params.h).
//
// Buckets: the flat buffer is cut into ranges of whole parameters, built from its end (the last
// layers, whose gradients the backward finishes first) to its start, each of about
// `bucket_bytes`. During the last micro-batch of a step (begin_sync), TrainModel's grad-ready hook
// calls grad_ready(); when every parameter of a bucket is ready the bucket is reduced over DP on a
// communication thread while the backward goes on (overlap). Buckets are always reduced in the
// same order (bucket 0 first), so every DP rank issues the same collectives in the same order
// whatever order its hooks come in; parameters the hook never named are taken as ready by
// finish_sync().
//
// Threads: the DP group is handed to the communication thread, which owns it (comm::Group's
// one-owner rule); every DP collective of a rank (bucket reductions, ZeRO's all-gather, sums of
// the loss and the gradient norm, checkpoint gathers) runs there. The rank's thread only waits.
//
// ZeRO-1 (Megatron's distributed optimizer): each bucket of n floats is cut into DP chunks of
// ceil(n/DP) (the last padded); DP rank d owns chunk d of every bucket. The gradients are
// reduce-scattered (each rank gets the sum of its chunks), AdamW's m and v exist only for the
// owned chunks (weight decay per element from the parameters a chunk intersects), the rank
// updates its chunks of the f32 values, and the values are all-gathered per bucket. Without ZeRO
// the buckets are all-reduced and every rank updates everything.
//
// Gradient scale: the model scales the loss gradient by 1/(G*S) (the mean over the global batch),
// so the DP sum of the gradients is the gradient of the mean: no division here.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/trace.h"
#include "parallm/train/optimizer.h"
#include "parallm/train/params.h"

namespace parallm::train {

struct DpOptions {
  int64_t bucket_bytes = int64_t{25} << 20;  // about 25 MB per bucket (PyTorch DDP's default)
  bool zero = false;                         // --zero 1
  bool overlap = true;  // false: reduce the buckets only after the backward (for comparison)
  // --trace: >= 0, the communication thread's spans under this rank, as thread `trace_thread`
  // named `trace_name`.
  int trace_rank = -1;
  int trace_thread = 1;
  const char* trace_name = "dp comm";
};

// A range of the flat buffers that this rank's optimizer updates, and where its m and v live.
struct OwnedSegment {
  int64_t begin = 0, end = 0;  // floats, into the flat buffers
  int64_t state = 0;           // offset into m() / v()
  bool decay = false;
  int tp_replicas = 1;     // Param::tp_replicas of the parameter it is part of
  bool tied_copy = false;  // Param::tied_copy: not counted by the global gradient norm
};

class DataParallel {
 public:
  struct Bucket {
    int64_t begin = 0, end = 0;           // floats, into the flat buffers
    int first_param = 0, last_param = 0;  // indices into params(), inclusive
    int64_t chunk = 0;                    // ZeRO: ceil((end - begin) / DP)
  };

  // `params`: the layout (ParamStore::params(), offsets into buffers of `size` floats; or a run of
  // them covering [first offset, size), as the MoE experts' reducer takes); `values`
  // and `grads`: the flat buffers (not owned; they outlive this object). `dp`: given to the
  // communication thread, which owns it from now on: the caller must not call through it again.
  DataParallel(std::vector<Param> params, int64_t size, float* values, float* grads, comm::Group dp,
               DpOptions options = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int dp_size() const { return dp_size_; }
  int dp_rank() const { return dp_rank_; }
  bool zero() const { return options_.zero; }
  const std::vector<Bucket>& buckets() const { return buckets_; }
  const std::vector<OwnedSegment>& owned() const { return owned_; }

  // The backward about to run is the last micro-batch's: reduce buckets as they complete.
  void begin_sync();
  // TrainModel's grad-ready hook (on the rank's thread). Ignored outside begin_sync/finish_sync.
  void grad_ready(const Param& p);
  // Marks every parameter ready and waits until every bucket is reduced: the gradients hold the
  // DP sum (with ZeRO: on the owned segments only). Rethrows a communication error.
  void finish_sync();

  // Sum of grad^2 over the owned segments, each parameter's part only where
  // Param::counts_once(tp_rank) (so a sum over the TP group counts every element once, and a sum
  // over the PP group counts a tied embedding on the first stage only).
  double local_grad_sq(int tp_rank) const;
  // The sum over the DP group of each rank's `x` (exact: gathered as bits, summed in rank order,
  // so every rank gets the same double). Collective over DP.
  double sum_over_dp(double x);
  // AdamW (step t, 1-based) on the owned segments, gradients times `grad_scale`; with ZeRO, then
  // the values are all-gathered over DP. Collective over DP with ZeRO.
  void step(const AdamWConfig& c, double lr, int64_t t, float grad_scale);

  // The optimizer state of the owned segments, back to back in owned() order.
  float* m() { return m_.data(); }
  float* v() { return v_.data(); }
  int64_t state_size() const { return static_cast<int64_t>(m_.size()); }
  // m and v as full flat buffers of `size` floats (the layout of the values), gathered over DP
  // with ZeRO; padding zero. Collective over DP.
  void gather_state(float* m_full, float* v_full);
  // Sets the owned state from full flat buffers (no communication).
  void scatter_state(const float* m_full, const float* v_full);

  // Bytes this rank holds for training, measured from what is allocated: values + grads (4 bytes
  // each per float of the flat buffers) + m + v (4 bytes each per owned float).
  uint64_t optimizer_bytes() const;
  // Elements of the parameters this rank holds (the flat buffers without their padding).
  int64_t param_numel() const { return param_numel_; }

  // Buckets of the last sync whose reduction started before finish_sync() (while the backward
  // still ran): the overlap, for tests and stats.
  int early_buckets() const { return early_buckets_; }

  // --trace: the communication thread's spans (the buckets' reductions) as TraceBuffer's JSON
  // fragment; empty without DpOptions::trace_rank. Read between syncs.
  std::string trace_events() const;

  // Runs fn on the communication thread with the DP group and waits; rethrows its exception.
  void run_on_comm(const std::function<void(const comm::Group&)>& fn);

 private:
  void comm_loop();
  void reduce_all_buckets();  // on the communication thread
  void reduce_bucket(const Bucket& b);
  void all_gather_bucket(const Bucket& b, float* data);
  void enqueue(std::function<void()> task);
  void wait_idle();

  std::vector<Param> params_;
  int64_t size_ = 0, param_numel_ = 0;
  float* values_ = nullptr;
  float* grads_ = nullptr;
  comm::Group dp_;
  int dp_size_ = 1, dp_rank_ = 0;
  DpOptions options_;
  std::vector<Bucket> buckets_;
  std::vector<int> bucket_of_param_;
  std::vector<OwnedSegment> owned_;
  std::vector<float> m_, v_;
  std::vector<float> send_scratch_, recv_scratch_;

  // Shared between the rank thread and the communication thread, under mu_.
  std::mutex mu_;
  std::condition_variable cv_;
  bool syncing_ = false, flushing_ = false, stop_ = false;
  std::vector<char> ready_;          // per parameter
  std::vector<int> bucket_pending_;  // per bucket: parameters not yet ready
  std::vector<std::function<void()>> queue_;
  int busy_ = 0;  // tasks queued or running
  int early_buckets_ = 0;
  std::exception_ptr error_;
  std::unique_ptr<TraceBuffer> comm_trace_;  // written by the communication thread only
  std::thread thread_;
};

}  // namespace parallm::train
