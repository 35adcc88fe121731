#include "parallm/comm/in_flight.h"

#include <chrono>

#include "parallm/core/error.h"

namespace parallm::comm {

InFlight::InFlight(int rank, int size, int world_rank, std::string name)
    : rank_(rank), size_(size), world_rank_(world_rank), name_(std::move(name)) {}

void InFlight::begin(Kind kind, double start_s, double deadline_s, int peer, int tag) {
  // One writer (the owner thread): plain read-modify-write of seq_ is safe.
  const uint64_t s = seq_.load(std::memory_order_relaxed);
  seq_.store(s + 1, std::memory_order_relaxed);
  // Orders the odd number before the field stores: a reader that sees any new field sees, at its
  // second look, a sequence number other than its first.
  std::atomic_thread_fence(std::memory_order_release);
  kind_.store(static_cast<int>(kind), std::memory_order_relaxed);
  peer_.store(peer, std::memory_order_relaxed);
  tag_.store(tag, std::memory_order_relaxed);
  start_.store(start_s, std::memory_order_relaxed);
  deadline_.store(deadline_s, std::memory_order_relaxed);
  const uint64_t n = calls_.load(std::memory_order_relaxed) + 1;
  calls_.store(n, std::memory_order_relaxed);
  call_.store(n, std::memory_order_relaxed);
  seq_.store(s + 2, std::memory_order_release);
}

void InFlight::end() {
  const uint64_t s = seq_.load(std::memory_order_relaxed);
  seq_.store(s + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  call_.store(0, std::memory_order_relaxed);
  seq_.store(s + 2, std::memory_order_release);
}

void InFlight::set_name(std::string name) {
  std::lock_guard<std::mutex> lock(name_mu_);
  name_ = std::move(name);
}

std::optional<InFlight::Snapshot> InFlight::snapshot() const {
  const uint64_t s1 = seq_.load(std::memory_order_acquire);
  if (s1 & 1) return std::nullopt;
  Snapshot snap;
  snap.call = call_.load(std::memory_order_relaxed);
  snap.kind = static_cast<Kind>(kind_.load(std::memory_order_relaxed));
  snap.peer = peer_.load(std::memory_order_relaxed);
  snap.tag = tag_.load(std::memory_order_relaxed);
  snap.start_s = start_.load(std::memory_order_relaxed);
  snap.deadline_s = deadline_.load(std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);
  if (seq_.load(std::memory_order_relaxed) != s1 || snap.call == 0) return std::nullopt;
  snap.rank = rank_;
  snap.size = size_;
  snap.world_rank = world_rank_;
  std::lock_guard<std::mutex> lock(name_mu_);
  snap.name = name_;
  return snap;
}

std::optional<InFlight::Snapshot> InFlight::overdue(double now_s) const {
  std::optional<Snapshot> snap = snapshot();
  if (snap && now_s >= snap->deadline_s) return snap;
  return std::nullopt;
}

std::string InFlight::Snapshot::describe() const {
  std::string s = cat("rank ", rank, " of group \"", name, "\" (size ", size, ", world rank ",
                      world_rank, ") in ", kind_name(kind));
  if (peer >= 0)
    s += cat(kind == Kind::Recv ? " from rank " : " to rank ", peer, tag >= 0 ? " tag " : "",
             tag >= 0 ? std::to_string(tag) : "");
  return s;
}

Watchdog::Watchdog(OnOverdue on_overdue, double period_s, std::function<double()> now)
    : on_overdue_(std::move(on_overdue)), period_s_(period_s), now_(std::move(now)) {
  thread_ = std::thread([this] { loop(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::add(const InFlight* in_flight) {
  std::lock_guard<std::mutex> lock(mu_);
  watched_.emplace(in_flight, 0);
}

void Watchdog::remove(const InFlight* in_flight) {
  std::lock_guard<std::mutex> lock(mu_);
  watched_.erase(in_flight);
}

void Watchdog::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::duration<double>(period_s_));
    if (stop_) break;
    const double now = now_();
    // Under mu_: remove() cannot return while an InFlight is being read.
    for (auto& [in_flight, reported] : watched_) {
      std::optional<InFlight::Snapshot> snap = in_flight->overdue(now);
      if (!snap || snap->call == reported) continue;
      reported = snap->call;
      on_overdue_(*snap);
    }
  }
}

}  // namespace parallm::comm
