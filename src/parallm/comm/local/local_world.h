// LocalWorld: what the rank threads of one local (in-process) launch share: the mailboxes for
// point-to-point messages, the state of every group for the shared-memory collectives, the
// statistics registry, and the abort flag that turns one rank's failure into an error in all the
// others instead of a hang.
//
// Waiting: a rank spins briefly (collectives between running threads finish in microseconds), then
// yields, then sleeps on a condition variable in slices, checking the abort flag and its deadline.
// With more ranks than hardware threads it skips the spinning.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallm/comm/stats.h"
#include "parallm/core/timer.h"

namespace parallm::comm::local {

// Thrown in the ranks that were waiting when another rank failed.
class Aborted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Shared by the ranks of one group (one per context id): published buffer pointers and a barrier.
struct GroupShared {
  explicit GroupShared(int n) : size(n), slots(n) {}
  struct alignas(64) Slot {
    const void* send = nullptr;      // written before a sync, read by others after it
    const size_t* counts = nullptr;  // all_to_all send counts
    // Small all-reduces: the rank's staging copies, two generations used in turn (LocalGroup).
    // Allocated and written only by the slot's rank, before a sync; read by the others after it.
    std::unique_ptr<float[]> staging[2];
  };
  const int size;
  std::vector<Slot> slots;
  alignas(64) std::atomic<uint64_t> arrived{0};
  alignas(64) std::atomic<uint64_t> generation{0};
};

// A receive posted before its message arrived; the sender copies straight into `data`.
struct PostedRecv {
  uint64_t ctx;
  int src;
  int tag;
  void* data;
  size_t bytes;
  size_t sent_bytes = 0;      // set by a sender whose size did not match
  std::atomic<int> state{0};  // kPosted -> kFilling -> kDone | kMismatch
  static constexpr int kPosted = 0, kFilling = 1, kDone = 2, kMismatch = 3;
};

class LocalWorld {
 public:
  explicit LocalWorld(int size);
  ~LocalWorld();

  int size() const { return size_; }
  const std::shared_ptr<StatsRegistry>& registry() const { return registry_; }

  // Waits until pred() holds. Throws Aborted if another rank failed, std::runtime_error if
  // `deadline` (seconds on the steady clock) passes; describe() names the waiting call.
  template <class Pred, class Describe>
  void wait(Pred&& pred, double deadline, double timeout_s, Describe&& describe) {
    for (int i = 0; i < spins_; ++i) {
      if (pred()) return;
      if (aborted_.load(std::memory_order_relaxed)) throw_aborted(describe());
      cpu_relax();
    }
    for (int i = 0; i < kYields; ++i) {
      if (pred()) return;
      if (aborted_.load(std::memory_order_relaxed)) throw_aborted(describe());
      yield();
    }
    if (!sleep_until(pred, deadline)) {
      if (aborted_.load()) throw_aborted(describe());
      throw_timeout(describe(), timeout_s);
    }
  }
  // Wakes sleeping waiters; call after changing anything a waiter may wait for.
  void notify() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(wait_mu_);
      cv_.notify_all();
    }
  }

  // Makes every waiting and future wait of the other ranks throw Aborted naming `rank` and
  // `message`. The first call wins; returns whether this one did.
  bool abort(int rank, const std::string& message);
  bool aborted() const { return aborted_.load(); }

  // Context ids: each group uses two (user point-to-point, algorithm traffic).
  uint64_t new_contexts(uint64_t n) { return next_ctx_.fetch_add(n); }
  std::shared_ptr<GroupShared> shared(uint64_t ctx, int size);

  // Point to point between world ranks. send never blocks: it copies into a posted receive, or
  // queues a copy of the message.
  void send(uint64_t ctx, int src, int dst, int tag, const void* data, size_t bytes);
  // Takes a queued message into pr, or posts pr for a later send; returns true if already done.
  bool post_recv(int dst, PostedRecv& pr);
  // Waits for a posted receive (see wait); on an exception, withdraws it first.
  template <class Describe>
  void wait_recv(int dst, PostedRecv& pr, double deadline, double timeout_s, Describe&& describe) {
    try {
      wait([&] { return pr.state.load(std::memory_order_acquire) >= PostedRecv::kDone; }, deadline,
           timeout_s, describe);
    } catch (...) {
      withdraw(dst, pr);
      throw;
    }
    check_size(pr, describe());
  }

  // Takes back a posted receive that will not be waited for (an error unwinds past it).
  void withdraw(int dst, PostedRecv& pr);

  static void cpu_relax();
  static void yield();

 private:
  static constexpr int kYields = 64;
  struct Message {
    uint64_t ctx;
    int src;
    int tag;
    std::unique_ptr<char[]> data;
    size_t bytes;
  };
  struct Mailbox {
    std::mutex mu;
    std::deque<Message> queued;      // arrived before their receive, in arrival order
    std::deque<PostedRecv*> posted;  // receives waiting for a message, in post order
  };

  template <class Pred>
  bool sleep_until(Pred& pred, double deadline);
  [[noreturn]] void throw_aborted(const std::string& where);
  [[noreturn]] static void throw_timeout(const std::string& where, double timeout_s);
  static void check_size(const PostedRecv& pr, const std::string& where);

  const int size_;
  const int spins_;
  std::shared_ptr<StatsRegistry> registry_ = std::make_shared<StatsRegistry>();
  std::unique_ptr<Mailbox[]> mailboxes_;

  std::atomic<bool> aborted_{false};
  std::mutex abort_mu_;
  int abort_rank_ = -1;
  std::string abort_message_;

  std::mutex wait_mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};

  std::atomic<uint64_t> next_ctx_{2};  // 0, 1: the world group
  std::mutex shared_mu_;
  std::map<uint64_t, std::shared_ptr<GroupShared>> shared_;
};

template <class Pred>
bool LocalWorld::sleep_until(Pred& pred, double deadline) {
  sleepers_.fetch_add(1, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  std::unique_lock<std::mutex> lock(wait_mu_);
  bool ok = true;
  for (;;) {
    if (pred()) break;
    if (aborted_.load()) {
      ok = false;
      break;
    }
    const double left = deadline - now_seconds();
    if (left <= 0) {
      ok = false;
      break;
    }
    // Slices bound the cost of any wake-up a notifier could miss; normally notify() wakes us.
    cv_.wait_for(lock, std::chrono::duration<double>(left < 0.05 ? left : 0.05));
  }
  lock.unlock();
  sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  return ok;
}

}  // namespace parallm::comm::local
