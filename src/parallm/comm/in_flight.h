// What a group has in flight, published by the group's owner thread and read by a watching thread
// (the MPI backend's watchdog, whose blocking MPI calls cannot time out by themselves), and the
// watchdog itself. Backend-independent, so that the local backend's tests run the same code under
// ThreadSanitizer.
//
// InFlight is a sequence lock over atomics: the owner thread writes the call's description (kind,
// peer, tag, start, deadline) between two increments of a sequence number; a reader takes the
// sequence number, the fields, and the sequence number again, and keeps the snapshot only if both
// are the same even number (no write in between). Every field is an atomic, so a reader racing a
// writer reads stale or torn values that it then throws away, never undefined behaviour. The
// group's name, which changes only at set_name (rare), sits behind a mutex.
//
// Cost on the owner thread: four relaxed stores and two release stores per call, no allocation.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "parallm/comm/stats.h"
#include "parallm/core/timer.h"  // now_seconds: the steady clock deadlines are measured on

namespace parallm::comm {

class InFlight {
 public:
  // rank, size, world_rank: fixed for the group's life; name: the group's name now.
  InFlight(int rank, int size, int world_rank, std::string name);
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

  // ---- owner thread
  // A call starts: `kind`, started at `start_s`, gives up at `deadline_s`; peer and tag for
  // send/recv (-1: none).
  void begin(Kind kind, double start_s, double deadline_s, int peer = -1, int tag = -1);
  void end();  // the call returned (or threw)
  void set_name(std::string name);

  // ---- any thread
  struct Snapshot {
    uint64_t call = 0;  // 1 for the group's first call, 2 for the next...
    Kind kind = Kind::Barrier;
    int peer = -1, tag = -1;
    double start_s = 0, deadline_s = 0;
    int rank = 0, size = 1, world_rank = 0;
    std::string name;
    // "rank 1 of group "tp" (size 2, world rank 3) in recv from rank 0 tag 7"
    std::string describe() const;
    double timeout_s() const { return deadline_s - start_s; }
  };
  // The call in flight now, or nothing when the group is idle (or a call is just starting or
  // ending: a reader that polls sees it on its next look).
  std::optional<Snapshot> snapshot() const;
  // The call in flight if it is past its deadline at `now_s`.
  std::optional<Snapshot> overdue(double now_s) const;

 private:
  // Even: stable; odd: the owner is writing. Incremented twice per begin and twice per end.
  std::atomic<uint64_t> seq_{0};
  std::atomic<uint64_t> call_{0};  // 0 when idle, else the call's number
  std::atomic<uint64_t> calls_{0};
  std::atomic<int> kind_{0};
  std::atomic<int> peer_{-1}, tag_{-1};
  std::atomic<double> start_{0}, deadline_{0};
  const int rank_, size_, world_rank_;
  mutable std::mutex name_mu_;
  std::string name_;
};

// A thread that looks at the watched groups every `period_s` and calls `on_overdue` (on the
// watchdog thread, with the watchdog's lock held: it must not call add or remove) once for each
// call that has passed its deadline. The MPI backend prints and aborts the job there; tests record
// it.
class Watchdog {
 public:
  using OnOverdue = std::function<void(const InFlight::Snapshot&)>;
  // now: the clock compared with deadlines (now_seconds; tests may move it).
  explicit Watchdog(OnOverdue on_overdue, double period_s = 0.05,
                    std::function<double()> now = now_seconds);
  ~Watchdog();  // stops and joins the thread
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // The InFlight must stay alive until remove() returns (after which the watchdog never reads it).
  void add(const InFlight* in_flight);
  void remove(const InFlight* in_flight);

 private:
  void loop();

  OnOverdue on_overdue_;
  const double period_s_;
  std::function<double()> now_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::map<const InFlight*, uint64_t> watched_;  // -> the last call reported overdue
  std::thread thread_;
};

}  // namespace parallm::comm
