#include "parallm/comm/local/local_world.h"

#include <sched.h>

#include <chrono>
#include <cstring>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallm/core/error.h"

namespace parallm::comm::local {

void LocalWorld::cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

void LocalWorld::yield() {
  sched_yield();
}

namespace {
int spin_count(int ranks) {
  const unsigned hw = std::thread::hardware_concurrency();
  // Spinning only helps when every rank has a core; otherwise it steals the core a peer needs.
  return hw != 0 && static_cast<unsigned>(ranks) <= hw ? 20000 : 0;
}
}  // namespace

LocalWorld::LocalWorld(int size)
    : size_(size), spins_(spin_count(size)), mailboxes_(new Mailbox[size]) {}

LocalWorld::~LocalWorld() = default;

bool LocalWorld::abort(int rank, const std::string& message) {
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(abort_mu_);
    if (abort_rank_ < 0) {
      abort_rank_ = rank;
      abort_message_ = message;
      first = true;
    }
  }
  aborted_.store(true);
  std::lock_guard<std::mutex> lock(wait_mu_);
  cv_.notify_all();
  return first;
}

void LocalWorld::throw_aborted(const std::string& where) {
  std::lock_guard<std::mutex> lock(abort_mu_);
  throw Aborted(cat("[comm] rank ", abort_rank_, " failed: ", abort_message_, " (", where,
                    " stopped waiting)"));
}

void LocalWorld::throw_timeout(const std::string& where, double timeout_s) {
  throw std::runtime_error(cat("[comm] ", where, " timed out after ", timeout_s,
                               " s (--comm-timeout): a peer rank is stuck, failed, or did not make "
                               "the matching call"));
}

std::shared_ptr<GroupShared> LocalWorld::shared(uint64_t ctx, int size) {
  std::lock_guard<std::mutex> lock(shared_mu_);
  auto& s = shared_[ctx];
  if (!s) s = std::make_shared<GroupShared>(size);
  return s;
}

void LocalWorld::send(uint64_t ctx, int src, int dst, int tag, const void* data, size_t bytes) {
  Mailbox& mb = mailboxes_[dst];
  PostedRecv* match = nullptr;
  {
    std::lock_guard<std::mutex> lock(mb.mu);
    for (auto it = mb.posted.begin(); it != mb.posted.end(); ++it) {
      PostedRecv* pr = *it;
      if (pr->ctx == ctx && pr->src == src && pr->tag == tag) {
        match = pr;
        mb.posted.erase(it);
        match->state.store(PostedRecv::kFilling, std::memory_order_relaxed);
        break;
      }
    }
    if (!match) {
      Message m{ctx, src, tag, std::unique_ptr<char[]>(new char[bytes > 0 ? bytes : 1]), bytes};
      if (bytes > 0) std::memcpy(m.data.get(), data, bytes);
      mb.queued.push_back(std::move(m));
      return;
    }
  }
  // Rendezvous: one copy, outside the lock. The receiver owns `match` again once state is final.
  if (match->bytes != bytes) {
    match->sent_bytes = bytes;
    match->state.store(PostedRecv::kMismatch, std::memory_order_release);
    notify();
    fail<std::runtime_error>("comm", "send of ", bytes, " bytes from world rank ", src,
                             " to world rank ", dst, " (tag ", tag, ") but the receive expects ",
                             match->bytes, " bytes");
  }
  if (bytes > 0) std::memcpy(match->data, data, bytes);
  match->state.store(PostedRecv::kDone, std::memory_order_release);
  notify();
}

bool LocalWorld::post_recv(int dst, PostedRecv& pr) {
  Mailbox& mb = mailboxes_[dst];
  Message m;
  {
    std::lock_guard<std::mutex> lock(mb.mu);
    auto it = mb.queued.begin();
    for (; it != mb.queued.end(); ++it)
      if (it->ctx == pr.ctx && it->src == pr.src && it->tag == pr.tag) break;
    if (it == mb.queued.end()) {
      mb.posted.push_back(&pr);
      return false;
    }
    m = std::move(*it);
    mb.queued.erase(it);
  }
  if (m.bytes != pr.bytes) {
    pr.sent_bytes = m.bytes;
    pr.state.store(PostedRecv::kMismatch, std::memory_order_relaxed);
  } else {
    if (m.bytes > 0) std::memcpy(pr.data, m.data.get(), m.bytes);
    pr.state.store(PostedRecv::kDone, std::memory_order_relaxed);
  }
  return true;
}

void LocalWorld::withdraw(int dst, PostedRecv& pr) {
  Mailbox& mb = mailboxes_[dst];
  {
    std::lock_guard<std::mutex> lock(mb.mu);
    for (auto it = mb.posted.begin(); it != mb.posted.end(); ++it) {
      if (*it == &pr) {
        mb.posted.erase(it);
        return;
      }
    }
  }
  // A sender took it and is copying into our buffer: let it finish before the buffer goes away.
  while (pr.state.load(std::memory_order_acquire) < PostedRecv::kDone) yield();
}

void LocalWorld::check_size(const PostedRecv& pr, const std::string& where) {
  if (pr.state.load(std::memory_order_acquire) == PostedRecv::kMismatch)
    fail<std::runtime_error>("comm", where, ": receive of ", pr.bytes, " bytes from world rank ",
                             pr.src, " (tag ", pr.tag, ") got a message of ", pr.sent_bytes,
                             " bytes");
}

}  // namespace parallm::comm::local
