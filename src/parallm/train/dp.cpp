#include "parallm/train/dp.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"

namespace parallm::train {

DataParallel::DataParallel(std::vector<Param> params, int64_t size, float* values, float* grads,
                           comm::Group dp, DpOptions options)
    : params_(std::move(params)),
      size_(size),
      values_(values),
      grads_(grads),
      dp_(std::move(dp)),
      options_(options) {
  // size() and rank() only read the handle's fixed fields: no call through the group.
  dp_size_ = dp_.size();
  dp_rank_ = dp_.rank();
  if (options_.bucket_bytes < 4)
    fail("dp", "bucket size must be at least 4 bytes, got ", options_.bucket_bytes);
  const int n = static_cast<int>(params_.size());
  for (int i = 0; i < n; ++i) {
    const Param& p = params_[i];
    if (p.offset < 0 || p.numel < 0 || p.offset + p.numel > size_ ||
        (i > 0 && p.offset < params_[i - 1].offset + params_[i - 1].numel))
      fail("dp", "parameter ", p.tensor.name, " at offset ", p.offset, " (", p.numel,
           " floats) breaks the flat layout of ", size_, " floats");
    param_numel_ += p.numel;
  }
  // Buckets of whole parameters from the end of the buffer (the backward's first gradients).
  bucket_of_param_.assign(n, 0);
  int j = n - 1;
  while (j >= 0) {
    const int last = j;
    const int64_t end = last + 1 < n ? params_[last + 1].offset : size_;
    int i = j;
    while (i > 0 && (end - params_[i].offset) * 4 < options_.bucket_bytes) --i;
    Bucket b;
    b.first_param = i;
    b.last_param = last;
    // The first bucket starts at the first parameter's offset (0 for a whole store; the experts'
    // range when this reducer holds the experts alone).
    b.begin = params_[i].offset;
    b.end = end;
    b.chunk = (b.end - b.begin + dp_size_ - 1) / dp_size_;
    for (int k = i; k <= last; ++k) bucket_of_param_[k] = static_cast<int>(buckets_.size());
    buckets_.push_back(b);
    j = i - 1;
  }
  if (n == 0 && size_ > 0) buckets_.push_back({0, size_, 0, -1, (size_ + dp_size_ - 1) / dp_size_});
  // What this rank's optimizer updates.
  const bool shard = options_.zero && dp_size_ > 1;
  int64_t state = 0;
  auto add = [&](const Param& p, int64_t lo, int64_t hi) {
    lo = std::max(lo, p.offset);
    hi = std::min(hi, p.offset + p.numel);
    if (hi <= lo) return;
    owned_.push_back({lo, hi, state, p.decay, p.tp_replicas, p.tied_copy});
    state += hi - lo;
  };
  if (!shard) {
    for (const Param& p : params_) add(p, p.offset, p.offset + p.numel);
  } else {
    for (const Bucket& b : buckets_) {
      const int64_t lo = b.begin + dp_rank_ * b.chunk, hi = std::min(lo + b.chunk, b.end);
      for (int k = b.first_param; k <= b.last_param; ++k) add(params_[k], lo, hi);
    }
  }
  m_.assign(state, 0.0f);
  v_.assign(state, 0.0f);
  ready_.assign(n, 0);
  bucket_pending_.assign(buckets_.size(), 0);
  if (dp_size_ > 1 && options_.trace_rank >= 0)
    comm_trace_ = std::make_unique<TraceBuffer>(options_.trace_rank, options_.trace_thread,
                                                options_.trace_name);
  if (dp_size_ > 1) thread_ = std::thread([this] { comm_loop(); });
}

DataParallel::~DataParallel() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void DataParallel::comm_loop() {
  // The communication thread's own pool: kernels the backend calls find it through
  // ThreadPool::current(), never the rank's pool (which is not reentrant).
  ThreadPool pool(1);
  ScopedPool scoped(pool);
  set_thread_trace(comm_trace_.get());
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ with nothing left
      task = std::move(queue_.front());
      queue_.erase(queue_.begin());
    }
    try {
      task();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      --busy_;
    }
    cv_.notify_all();
  }
}

void DataParallel::enqueue(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(task));
    ++busy_;
  }
  cv_.notify_all();
}

void DataParallel::wait_idle() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return busy_ == 0; });
  if (error_) std::rethrow_exception(error_);
}

void DataParallel::run_on_comm(const std::function<void(const comm::Group&)>& fn) {
  if (!thread_.joinable()) {
    fn(dp_);
    return;
  }
  enqueue([this, &fn] { fn(dp_); });
  wait_idle();
}

void DataParallel::begin_sync() {
  if (dp_size_ == 1) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_) std::rethrow_exception(error_);
    std::fill(ready_.begin(), ready_.end(), 0);
    for (size_t b = 0; b < buckets_.size(); ++b) {
      int pending = 0;
      for (int k = buckets_[b].first_param; k <= buckets_[b].last_param; ++k)
        pending += params_[k].numel > 0;
      bucket_pending_[b] = pending;
    }
    syncing_ = true;
    flushing_ = false;
    early_buckets_ = 0;
  }
  if (options_.overlap) enqueue([this] { reduce_all_buckets(); });
}

void DataParallel::grad_ready(const Param& p) {
  if (dp_size_ == 1 || p.numel == 0) return;
  // The parameter by its offset (the layout is sorted by offset).
  auto it = std::lower_bound(params_.begin(), params_.end(), p.offset,
                             [](const Param& q, int64_t off) { return q.offset < off; });
  while (it != params_.end() && it->offset == p.offset && it->numel == 0) ++it;
  if (it == params_.end() || it->offset != p.offset) return;
  const size_t i = static_cast<size_t>(it - params_.begin());
  bool notify = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!syncing_ || ready_[i]) return;
    ready_[i] = 1;
    notify = --bucket_pending_[bucket_of_param_[i]] == 0;
  }
  if (notify) cv_.notify_all();
}

void DataParallel::finish_sync() {
  if (dp_size_ == 1) return;
  bool started = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!syncing_) {  // no begin_sync: reduce everything now
      syncing_ = true;
      started = false;
      early_buckets_ = 0;
    }
    flushing_ = true;
  }
  cv_.notify_all();
  if (!started || !options_.overlap) enqueue([this] { reduce_all_buckets(); });
  TraceSpan span("dp flush", "wait");
  wait_idle();
  std::lock_guard<std::mutex> lock(mu_);
  syncing_ = false;
  flushing_ = false;
}

void DataParallel::reduce_all_buckets() {
  for (size_t b = 0; b < buckets_.size(); ++b) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || flushing_ || bucket_pending_[b] == 0; });
      if (stop_) return;
      if (!flushing_) ++early_buckets_;
    }
    TraceSpan span(thread_trace() ? cat("dp bucket ", b, " (",
                                        (buckets_[b].end - buckets_[b].begin) * 4, " B)")
                                  : std::string(),
                   "comm");
    reduce_bucket(buckets_[b]);
  }
}

void DataParallel::reduce_bucket(const Bucket& b) {
  const int64_t n = b.end - b.begin;
  if (n == 0) return;
  if (!options_.zero) {
    dp_.all_reduce(grads_ + b.begin, static_cast<size_t>(n), DType::F32, comm::ReduceOp::Sum);
    return;
  }
  // reduce_scatter takes equal blocks: pad the bucket to DP chunks when it does not divide.
  const int64_t padded = b.chunk * dp_size_;
  const float* send = grads_ + b.begin;
  if (padded != n) {
    send_scratch_.assign(static_cast<size_t>(padded), 0.0f);
    std::memcpy(send_scratch_.data(), grads_ + b.begin, static_cast<size_t>(n) * 4);
    send = send_scratch_.data();
  }
  recv_scratch_.resize(static_cast<size_t>(b.chunk));
  dp_.reduce_scatter(send, recv_scratch_.data(), static_cast<size_t>(b.chunk), DType::F32,
                     comm::ReduceOp::Sum);
  const int64_t lo = dp_rank_ * b.chunk;
  const int64_t len = std::clamp<int64_t>(n - lo, 0, b.chunk);
  if (len > 0)
    std::memcpy(grads_ + b.begin + lo, recv_scratch_.data(), static_cast<size_t>(len) * 4);
}

void DataParallel::all_gather_bucket(const Bucket& b, float* data) {
  const int64_t n = b.end - b.begin;
  if (n == 0) return;
  const int64_t padded = b.chunk * dp_size_;
  const int64_t lo = dp_rank_ * b.chunk;
  const int64_t len = std::clamp<int64_t>(n - lo, 0, b.chunk);
  send_scratch_.assign(static_cast<size_t>(b.chunk), 0.0f);
  if (len > 0) std::memcpy(send_scratch_.data(), data + b.begin + lo, static_cast<size_t>(len) * 4);
  if (padded == n) {
    dp_.all_gather(send_scratch_.data(), data + b.begin, static_cast<size_t>(b.chunk), DType::F32);
    return;
  }
  recv_scratch_.resize(static_cast<size_t>(padded));
  dp_.all_gather(send_scratch_.data(), recv_scratch_.data(), static_cast<size_t>(b.chunk),
                 DType::F32);
  std::memcpy(data + b.begin, recv_scratch_.data(), static_cast<size_t>(n) * 4);
}

double DataParallel::local_grad_sq(int tp_rank) const {
  double sum = 0;
  for (const OwnedSegment& s : owned_) {
    if (s.tied_copy || tp_rank % s.tp_replicas != 0) continue;
    sum += sum_of_squares(grads_ + s.begin, s.end - s.begin);
  }
  return sum;
}

double DataParallel::sum_over_dp(double x) {
  if (dp_size_ == 1) return x;
  std::vector<double> all(static_cast<size_t>(dp_size_));
  run_on_comm([&](const comm::Group& g) { g.all_gather(&x, all.data(), 1, DType::I64); });
  double sum = 0;
  for (double v : all) sum += v;
  return sum;
}

void DataParallel::step(const AdamWConfig& c, double lr, int64_t t, float grad_scale) {
  for (const OwnedSegment& s : owned_)
    adamw_update(values_ + s.begin, grads_ + s.begin, m_.data() + s.state, v_.data() + s.state,
                 s.end - s.begin, s.decay, c, lr, t, grad_scale);
  if (options_.zero && dp_size_ > 1)
    run_on_comm([&](const comm::Group&) {
      for (const Bucket& b : buckets_) all_gather_bucket(b, values_);
    });
}

void DataParallel::gather_state(float* m_full, float* v_full) {
  // Only this reducer's range: another reducer may hold the rest of the same buffers.
  const int64_t lo = params_.empty() ? 0 : params_.front().offset;
  std::fill(m_full + lo, m_full + size_, 0.0f);
  std::fill(v_full + lo, v_full + size_, 0.0f);
  for (const OwnedSegment& s : owned_) {
    std::memcpy(m_full + s.begin, m_.data() + s.state, static_cast<size_t>(s.end - s.begin) * 4);
    std::memcpy(v_full + s.begin, v_.data() + s.state, static_cast<size_t>(s.end - s.begin) * 4);
  }
  if (options_.zero && dp_size_ > 1)
    run_on_comm([&](const comm::Group&) {
      for (const Bucket& b : buckets_) {
        all_gather_bucket(b, m_full);
        all_gather_bucket(b, v_full);
      }
    });
}

void DataParallel::scatter_state(const float* m_full, const float* v_full) {
  for (const OwnedSegment& s : owned_) {
    std::memcpy(m_.data() + s.state, m_full + s.begin, static_cast<size_t>(s.end - s.begin) * 4);
    std::memcpy(v_.data() + s.state, v_full + s.begin, static_cast<size_t>(s.end - s.begin) * 4);
  }
}

std::string DataParallel::trace_events() const {
  return comm_trace_ ? comm_trace_->to_json_events() : std::string();
}

uint64_t DataParallel::optimizer_bytes() const {
  return 4 * (2 * static_cast<uint64_t>(size_) + m_.size() + v_.size());
}

}  // namespace parallm::train
