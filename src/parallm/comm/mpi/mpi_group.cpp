#include "parallm/comm/mpi/mpi_group.h"

// C bindings only: the C++ bindings of Open MPI / MPICH would need their own library.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "parallm/comm/in_flight.h"
#include "parallm/core/error.h"

namespace parallm::comm::mpi {
namespace {

class Runtime {
 public:
  static Runtime& get() {
    static Runtime runtime;
    return runtime;
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int thread_level() const { return thread_level_; }
  // How this rank waits for MPI (PARALLM_MPI_WAIT): false = MPI's blocking calls, which spin;
  // true = a nonblocking call polled, with sleeps between polls once the wait is long.
  bool sleeps() const { return sleeps_; }

  Watchdog& watchdog() { return *watchdog_; }

  ~Runtime() {
    watchdog_.reset();  // stops its thread
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_ && !finalized) MPI_Finalize();
  }

 private:
  Runtime() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      tcp_eager_by_default();
      // Several threads of a rank may talk (e.g. a server thread beside the engine).
      if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &thread_level_) != MPI_SUCCESS)
        fail<std::runtime_error>("comm", "MPI_Init_thread failed");
      owns_ = true;
    } else {
      MPI_Query_thread(&thread_level_);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    sleeps_ = resolve_wait_mode();
    // Blocking MPI calls cannot time out: the watchdog thread reads each group's InFlight (a
    // snapshot through atomics, never the fields the rank thread writes) and ends the job.
    watchdog_ =
        std::make_unique<Watchdog>([this](const InFlight::Snapshot& call) { timed_out(call); });
  }

  [[noreturn]] void timed_out(const InFlight::Snapshot& call) const {
    const std::string msg =
        cat("[comm] MPI rank ", rank_, ": ", call.describe(), " timed out after ", call.timeout_s(),
            " s (--comm-timeout): a peer rank is stuck, failed, or did not make the matching "
            "call; aborting the job");
    std::fprintf(stderr, "%s\n", msg.c_str());
    std::fflush(stderr);
    // MPI_Abort from this thread needs MPI_THREAD_MULTIPLE; otherwise exiting without
    // MPI_Finalize makes mpirun end the job.
    if (thread_level_ == MPI_THREAD_MULTIPLE) MPI_Abort(MPI_COMM_WORLD, 1);
    _exit(1);
  }

  // Open MPI over TCP (ranks on different machines) sends a message above its eager limit (64 KiB)
  // only after the receiver's acknowledgement, and that acknowledgement travels on the one socket
  // between the two ranks, behind whatever the receiver is sending itself. When both send at once,
  // as in every all-reduce, one rank's acknowledgement waited behind its own message and the two
  // messages crossed the link one after the other: all-reduces of 256 KiB to 16 MiB ran at half
  // the link's rate about half the time (docs/benchmarks.md, "Emulated clusters"). Eager sends
  // up to 64 MiB (more than a DP bucket or a TP prefill message) need no acknowledgement; the
  // receiver buffers a message that comes before its receive is posted. A value the user set
  // (OMPI_MCA_... or --mca, which mpirun passes the same way) is kept.
  static void tcp_eager_by_default() {
#ifdef OPEN_MPI
    setenv("OMPI_MCA_btl_tcp_eager_limit", "67108864", 0);
    setenv("OMPI_MCA_btl_tcp_rndv_eager_limit", "67108864", 0);
#endif
  }

  // spin | sleep | auto (the default): sleep where this machine holds more ranks than cores, so
  // that a waiting rank (a PP stage waiting for the others, a rank waiting in a collective) does
  // not take the core from one that computes.
  static bool resolve_wait_mode() {
    const char* env = std::getenv("PARALLM_MPI_WAIT");
    const std::string mode = env ? env : "auto";
    if (mode == "spin") return false;
    if (mode == "sleep") return true;
    if (mode != "auto")
      fail("comm", "PARALLM_MPI_WAIT: '", mode, "' is not one of spin, sleep, auto");
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    int here = 1;
    MPI_Comm_size(node, &here);
    MPI_Comm_free(&node);
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 0 && here > cores;
  }

  bool sleeps_ = false;
  bool owns_ = false;
  int thread_level_ = 0;
  int rank_ = 0, size_ = 1;
  std::unique_ptr<Watchdog> watchdog_;
};

void check(int rc, const char* call, const GroupImpl& g) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  fail<std::runtime_error>("comm", call, " failed in ", g.describe(), ": ", std::string(text, len));
}

// Waits for `n` requests: polls them for kSpinWindow, then sleeps kSleep between polls (MPI
// progresses only inside its calls, so a longer sleep would delay the rounds of a collective).
void wait_all(int n, MPI_Request* requests, MPI_Status* statuses, const char* call,
              const GroupImpl& g) {
  // A TP all-reduce across a link finishes inside the window (measured on the emulated cluster:
  // with 50 us, TCP all-reduces advanced only between sleeps, 12.5 -> 17 ms a token); a PP stage
  // waiting for the others (milliseconds) sleeps through most of its wait.
  constexpr auto kSpinWindow = std::chrono::milliseconds(1);
  constexpr auto kSleep = std::chrono::microseconds(20);
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    int done = 0;
    check(MPI_Testall(n, requests, &done, statuses), call, g);
    if (done) return;
    if (std::chrono::steady_clock::now() - t0 > kSpinWindow) std::this_thread::sleep_for(kSleep);
  }
}

// One MPI call whose nonblocking form takes the same arguments and a request (MPI_Allreduce and
// MPI_Iallreduce, ...): the blocking form, or where the runtime sleeps the nonblocking one and
// wait_all.
#define PLM_MPI_CALL(blocking, nonblocking, ...)                      \
  do {                                                                \
    if (!Runtime::get().sleeps()) {                                   \
      check(blocking(__VA_ARGS__), #blocking, *this);                 \
    } else {                                                          \
      MPI_Request plm_rq;                                             \
      check(nonblocking(__VA_ARGS__, &plm_rq), #nonblocking, *this);  \
      wait_all(1, &plm_rq, MPI_STATUSES_IGNORE, #nonblocking, *this); \
    }                                                                 \
  } while (0)

int as_int(size_t n, const char* what, const GroupImpl& g) {
  if (n > static_cast<size_t>(INT_MAX))
    fail("comm", g.describe(), ": ", what, " of ", n, " exceeds MPI's int limit ", INT_MAX);
  return static_cast<int>(n);
}

MPI_Op mpi_op(ReduceOp op) {
  return op == ReduceOp::Sum ? MPI_SUM : MPI_MAX;
}
// Element types for moving data (reductions always run on f32; Group refuses to reduce integers).
MPI_Datatype mpi_type(DType d) {
  switch (d) {
    case DType::F32:
      return MPI_FLOAT;
    case DType::BF16:
    case DType::F16:
      return MPI_UINT16_T;
    case DType::I32:
      return MPI_INT32_T;
    case DType::I64:
      return MPI_INT64_T;
    case DType::U8:
      return MPI_UINT8_T;
    case DType::Q8_0:
    case DType::Q4_0:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
      break;  // block-quantized weights never travel between ranks: each reads its own slice
  }
  fail<std::logic_error>("comm", "MPI: no MPI datatype for dtype ", static_cast<int>(d));
}

constexpr size_t kChunk = size_t(1) << 30;  // user messages above INT_MAX bytes go in chunks

class MpiGroup final : public GroupImpl {
 public:
  // Takes ownership of `comm`; duplicates it for the algorithms' traffic.
  MpiGroup(MPI_Comm comm, std::shared_ptr<CommStats> stats, CommOptions options,
           std::shared_ptr<StatsRegistry> registry)
      : GroupImpl(rank_of(comm), size_of(comm), Runtime::get().rank(), std::move(stats), options,
                  std::move(registry)),
        comm_(comm) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_dup(comm_, &coll_);
    MPI_Comm_set_errhandler(coll_, MPI_ERRORS_RETURN);
    Runtime::get().watchdog().add(&in_flight());
  }
  ~MpiGroup() override {
    Runtime::get().watchdog().remove(&in_flight());
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) {
      // Sends nobody received within the timeout are left behind (with their buffers) rather than
      // hanging here.
      const double deadline = now_seconds() + options_.timeout_s;
      while (!pending_.empty() && now_seconds() < deadline) {
        reap();
        if (!pending_.empty()) std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      for (Pending& p : pending_) p.data.release();
      MPI_Comm_free(&coll_);
      MPI_Comm_free(&comm_);
    }
  }

  std::string_view backend() const override { return "mpi"; }

  // Like the local backend, send never waits for the matching recv (so that stages may send to
  // each other around a ring): the bytes are copied and sent with MPI_Isend; finished sends are
  // reaped on later calls and waited for when the group goes away.
  void send(const void* data, size_t bytes, int dst, int tag) override {
    reap();
    Pending pending;
    pending.data.reset(new char[bytes > 0 ? bytes : 1]);
    if (bytes > 0) std::memcpy(pending.data.get(), data, bytes);
    const char* p = pending.data.get();
    do {
      const size_t n = std::min(bytes, kChunk);
      MPI_Request req;
      check(MPI_Isend(p, static_cast<int>(n), MPI_BYTE, dst, tag, comm_, &req), "MPI_Isend", *this);
      pending.requests.push_back(req);
      p += n;
      bytes -= n;
    } while (bytes > 0);
    pending_.push_back(std::move(pending));
  }
  void recv(void* data, size_t bytes, int src, int tag) override {
    char* p = static_cast<char*>(data);
    do {
      const size_t n = std::min(bytes, kChunk);
      MPI_Status st;
      recv_one(p, static_cast<int>(n), src, tag, comm_, &st);
      int got = 0;
      MPI_Get_count(&st, MPI_BYTE, &got);
      if (static_cast<size_t>(got) != n)
        fail<std::runtime_error>("comm", describe(), ": receive of ", n, " bytes from rank ", src,
                                 " (tag ", tag, ") got a message of ", got, " bytes");
      p += n;
      bytes -= n;
    } while (bytes > 0);
  }

  void native_all_reduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    const int n = as_int(count, "all_reduce count", *this);
    if (dtype == DType::F32) {
      PLM_MPI_CALL(MPI_Allreduce, MPI_Iallreduce, MPI_IN_PLACE, data, n, MPI_FLOAT, mpi_op(op),
                   comm_);
      return;
    }
    // MPI has no bf16/f16 reductions: reduce in f32 and round once.
    std::vector<float> work(count);
    convert(data, dtype, work.data(), DType::F32, count);
    PLM_MPI_CALL(MPI_Allreduce, MPI_Iallreduce, MPI_IN_PLACE, work.data(), n, MPI_FLOAT, mpi_op(op),
                 comm_);
    convert(work.data(), DType::F32, data, dtype, count);
  }

  void native_all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    const int n = as_int(count, "all_gather count", *this);
    const char* own = static_cast<const char*>(recv) + rank_ * count * dtype_size(dtype);
    PLM_MPI_CALL(MPI_Allgather, MPI_Iallgather, own == send ? MPI_IN_PLACE : send, n,
                 mpi_type(dtype), recv, n, mpi_type(dtype), comm_);
  }

  void native_reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                             ReduceOp op) override {
    const int n = as_int(count, "reduce_scatter count", *this);
    as_int(count * size_, "reduce_scatter input", *this);
    if (dtype == DType::F32) {
      PLM_MPI_CALL(MPI_Reduce_scatter_block, MPI_Ireduce_scatter_block, send, recv, n, MPI_FLOAT,
                   mpi_op(op), comm_);
      return;
    }
    std::vector<float> in(count * size_), out(count);
    convert(send, dtype, in.data(), DType::F32, in.size());
    PLM_MPI_CALL(MPI_Reduce_scatter_block, MPI_Ireduce_scatter_block, in.data(), out.data(), n,
                 MPI_FLOAT, mpi_op(op), comm_);
    convert(out.data(), DType::F32, recv, dtype, count);
  }

  void native_all_to_all(const void* send, const size_t* send_counts, void* recv,
                         const size_t* recv_counts, DType dtype) override {
    std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
    size_t so = 0, ro = 0;
    for (int i = 0; i < size_; ++i) {
      sc[i] = as_int(send_counts[i], "all_to_all send count", *this);
      rc[i] = as_int(recv_counts[i], "all_to_all recv count", *this);
      sd[i] = as_int(so, "all_to_all send offset", *this);
      rd[i] = as_int(ro, "all_to_all recv offset", *this);
      so += send_counts[i];
      ro += recv_counts[i];
    }
    PLM_MPI_CALL(MPI_Alltoallv, MPI_Ialltoallv, send, sc.data(), sd.data(), mpi_type(dtype), recv,
                 rc.data(), rd.data(), mpi_type(dtype), comm_);
  }

  void native_broadcast(void* data, size_t count, DType dtype, int root) override {
    const int n = as_int(count, "broadcast count", *this);
    PLM_MPI_CALL(MPI_Bcast, MPI_Ibcast, data, n, mpi_type(dtype), root, comm_);
  }

  void barrier() override { PLM_MPI_CALL(MPI_Barrier, MPI_Ibarrier, comm_); }

  std::shared_ptr<GroupImpl> split(int color, int key) override {
    MPI_Comm sub;
    check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split", *this);
    return std::make_shared<MpiGroup>(sub, new_stats("split", size_of(sub)), options_, registry_);
  }

  bool one_machine() override {
    MPI_Comm node;
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
          "MPI_Comm_split_type", *this);
    const int here = size_of(node);
    MPI_Comm_free(&node);
    return here == size_;
  }

  Algorithm choose(Kind kind, size_t bytes) const override {
    // See docs/benchmarks.md (Open MPI 4.1, 2 ranks on one node): MPI's own collectives are as
    // fast or faster up to 16 MiB; from 32 MiB our ring all-reduce takes 0.55-0.6x of
    // MPI_Allreduce's time.
    if (kind == Kind::AllReduce && bytes >= kRingAllReduceMinBytes) return Algorithm::Ring;
    return Algorithm::Native;
  }
  static constexpr size_t kRingAllReduceMinBytes = size_t{32} << 20;

 protected:
  void do_coll_send(const void* data, size_t bytes, int dst) override {
    const int n = as_int(bytes, "message size", *this);
    PLM_MPI_CALL(MPI_Send, MPI_Isend, data, n, MPI_BYTE, dst, 0, coll_);
  }
  void do_coll_recv(void* data, size_t bytes, int src) override {
    recv_one(data, as_int(bytes, "message size", *this), src, 0, coll_, MPI_STATUS_IGNORE);
  }
  void do_coll_sendrecv(const void* send, size_t send_bytes, int dst, void* recv, size_t recv_bytes,
                        int src) override {
    const int ns = as_int(send_bytes, "message size", *this);
    const int nr = as_int(recv_bytes, "message size", *this);
    if (!Runtime::get().sleeps()) {
      check(MPI_Sendrecv(send, ns, MPI_BYTE, dst, 0, recv, nr, MPI_BYTE, src, 0, coll_,
                         MPI_STATUS_IGNORE),
            "MPI_Sendrecv", *this);
      return;
    }
    MPI_Request rq[2];
    check(MPI_Irecv(recv, nr, MPI_BYTE, src, 0, coll_, &rq[0]), "MPI_Irecv", *this);
    check(MPI_Isend(send, ns, MPI_BYTE, dst, 0, coll_, &rq[1]), "MPI_Isend", *this);
    wait_all(2, rq, MPI_STATUSES_IGNORE, "MPI_Sendrecv", *this);
  }

 private:
  static int rank_of(MPI_Comm c) {
    int r = 0;
    MPI_Comm_rank(c, &r);
    return r;
  }
  static int size_of(MPI_Comm c) {
    int s = 0;
    MPI_Comm_size(c, &s);
    return s;
  }

  void recv_one(void* data, int n, int src, int tag, MPI_Comm comm, MPI_Status* status) {
    if (!Runtime::get().sleeps()) {
      check(MPI_Recv(data, n, MPI_BYTE, src, tag, comm, status), "MPI_Recv", *this);
      return;
    }
    MPI_Request rq;
    check(MPI_Irecv(data, n, MPI_BYTE, src, tag, comm, &rq), "MPI_Irecv", *this);
    wait_all(1, &rq, status == MPI_STATUS_IGNORE ? MPI_STATUSES_IGNORE : status, "MPI_Irecv",
             *this);
  }

  struct Pending {
    std::unique_ptr<char[]> data;
    std::vector<MPI_Request> requests;
  };
  void reap() {
    while (!pending_.empty()) {
      Pending& p = pending_.front();
      int done = 0;
      MPI_Testall(static_cast<int>(p.requests.size()), p.requests.data(), &done,
                  MPI_STATUSES_IGNORE);
      if (!done) break;  // later sends are usually later to finish too
      pending_.pop_front();
    }
  }

  MPI_Comm comm_;
  MPI_Comm coll_;
  std::deque<Pending> pending_;
};

}  // namespace

void ensure_initialized() {
  Runtime::get();
}
int world_rank() {
  return Runtime::get().rank();
}
int world_size() {
  return Runtime::get().size();
}

std::shared_ptr<GroupImpl> make_world_group(CommOptions options,
                                            std::shared_ptr<StatsRegistry> registry) {
  Runtime& rt = Runtime::get();
  MPI_Comm world;
  MPI_Comm_dup(MPI_COMM_WORLD, &world);
  auto stats = registry ? registry->make("world", rt.size(), rt.rank())
                        : std::make_shared<CommStats>("world", rt.size(), rt.rank());
  return std::make_shared<MpiGroup>(world, std::move(stats), options, std::move(registry));
}

void abort_job(const std::string& message, int code) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  _exit(code);
}

}  // namespace parallm::comm::mpi
