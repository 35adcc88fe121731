// ThreadPool: the threads inside one rank. The calling thread takes part, so a pool of size 1 runs
// everything inline. Kernels find the pool of the rank they run on through ThreadPool::current(),
// a thread-local pointer that each rank sets, so kernel signatures carry no pool argument.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace parallm {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over [0, n) split into size() contiguous, nearly equal parts, one per
  // thread (static: best for memory-bound loops where each thread streams its own rows).
  // Blocks until all parts are done. Not reentrant: fn must not call parallel_for.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);
  // Same, but parts of `grain` items are handed out dynamically (uneven work, e.g. attention
  // heads).
  void parallel_for_dynamic(int64_t n, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& fn);

  // The pool of the calling thread (set by ScopedPool); a process-wide 1-thread pool by default.
  static ThreadPool& current();
  // Number of hardware threads, at least 1.
  static int hardware_threads();

 private:
  void worker_loop(int id);
  void run(int id);

  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t grain_ = 0;  // 0: static split
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
};

// Makes `pool` the current pool of this thread for the scope's lifetime.
class ScopedPool {
 public:
  explicit ScopedPool(ThreadPool& pool);
  ~ScopedPool();
  ScopedPool(const ScopedPool&) = delete;
  ScopedPool& operator=(const ScopedPool&) = delete;

 private:
  ThreadPool* previous_;
};

}  // namespace parallm
