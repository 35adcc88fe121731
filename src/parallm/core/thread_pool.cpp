#include "parallm/core/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallm/core/error.h"

namespace parallm {
namespace {

thread_local ThreadPool* t_current = nullptr;

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Spin this many times before sleeping: decode issues hundreds of parallel_for calls per token,
// each a few microseconds long, so waking from a futex every time would dominate.
constexpr int kSpins = 1 << 14;

}  // namespace

ThreadPool::ThreadPool(int threads) {
  if (threads < 1) fail("threads", "thread count must be >= 1, got ", threads);
  workers_.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  generation_.fetch_add(1);
  generation_.notify_all();
  for (auto& t : workers_) t.join();
}

int ThreadPool::hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

ThreadPool& ThreadPool::current() {
  if (t_current) return *t_current;
  static ThreadPool single(1);
  return single;
}

void ThreadPool::run(int id) {
  const int64_t n = n_;
  if (grain_ == 0) {
    const int64_t parts = size();
    const int64_t begin = n * id / parts, end = n * (id + 1) / parts;
    if (begin < end) (*fn_)(begin, end);
    return;
  }
  for (;;) {
    const int64_t begin = next_.fetch_add(grain_);
    if (begin >= n) break;
    (*fn_)(begin, std::min(n, begin + grain_));
  }
}

void ThreadPool::worker_loop(int id) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t g = generation_.load(std::memory_order_acquire);
    for (int i = 0; g == seen && i < kSpins; ++i) {
      cpu_relax();
      g = generation_.load(std::memory_order_acquire);
    }
    while (g == seen) {
      generation_.wait(seen);
      g = generation_.load(std::memory_order_acquire);
    }
    seen = g;
    if (stop_.load()) return;
    run(id);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    fn(0, n);
    return;
  }
  fn_ = &fn;
  n_ = n;
  grain_ = 0;
  pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  run(0);
  while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
}

void ThreadPool::parallel_for_dynamic(int64_t n, int64_t grain,
                                      const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (workers_.empty() || n <= grain) {
    fn(0, n);
    return;
  }
  fn_ = &fn;
  n_ = n;
  grain_ = grain;
  next_.store(0, std::memory_order_relaxed);
  pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  run(0);
  while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
}

ScopedPool::ScopedPool(ThreadPool& pool) : previous_(t_current) {
  t_current = &pool;
}
ScopedPool::~ScopedPool() {
  t_current = previous_;
}

}  // namespace parallm
