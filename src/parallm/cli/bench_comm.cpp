// parallm bench comm: time every collective from 4 B to 64 MiB, nccl-tests style (time, algorithm
// bandwidth, bus bandwidth), for each algorithm, beside baselines for all_reduce: a memcpy of the
// same bytes plus a barrier, and (local backend) the same bytes copied from another rank's buffer
// that it has just written, plus two barriers: the data that must cross between cores; then fit
// latency (alpha) and per-byte cost (beta) for each op, for the planner; then time the ranks'
// arrival skew on work of their own (skew_probe below). With --load N, each collective again
// while N threads a rank run matmuls beside it (Load below): what a DP gradient bucket costs
// under the backward, and what the backward keeps of its speed meanwhile. With --share-probe G,
// groups of G ranks taking turns on shared cores, alone and all at once (share_probe below).
//
//   parallm bench comm --ranks 4 --op all_reduce                  # local backend, 4 threads
//   mpirun -np 2 parallm bench comm --op all --json comm.json     # MPI backend
//
// Sizes are nccl-tests': all_reduce and broadcast the buffer, all_gather the gathered output,
// reduce_scatter and all_to_all the input of one rank, sendrecv one message. Bus bandwidth is
// algbw x 2(p-1)/p for all_reduce, x (p-1)/p for all_gather, reduce_scatter and all_to_all, x 1
// for broadcast and sendrecv.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "parallm/cli/command.h"
#include "parallm/comm/group.h"
#include "parallm/comm/launch.h"
#include "parallm/core/error.h"
#include "parallm/core/tensor.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"
#include "parallm/kernels/matmul.h"

namespace parallm::cli {
namespace {

using comm::Algorithm;
using comm::Group;

struct Options {
  std::string backend = "auto";
  int ranks = 2;
  std::string op = "all";
  std::string algo = "all";
  uint64_t min_bytes = 4, max_bytes = uint64_t{64} << 20;
  int factor = 2;
  int iters = 0;  // 0: by size
  std::string dtype = "f32";
  std::string json;
  double timeout_s = 300;
  bool comm_stats = false;
  int skew_rounds = 60;  // 0: no arrival-skew probe
  int share_group = 0;  // --share-probe G: groups of G ranks taking turns on shared cores (0: none)
  int share_cores = 0;  // --share-cores: the cores they share (0: the machine's online CPUs)
  int threads = 1;       // threads per rank for the probe's work
  int load = 0;          // --load: threads a rank computing beside a second, loaded sweep
};

std::string human(size_t bytes) {
  char b[32];
  if (bytes >= (1u << 20) && bytes % (1u << 20) == 0)
    std::snprintf(b, sizeof b, "%zuM", bytes >> 20);
  else if (bytes >= 1024 && bytes % 1024 == 0)
    std::snprintf(b, sizeof b, "%zuK", bytes >> 10);
  else
    std::snprintf(b, sizeof b, "%zu", bytes);
  return b;
}

double bus_factor(const std::string& op, int p) {
  if (op == "all_reduce") return 2.0 * (p - 1) / p;
  if (op == "all_gather" || op == "reduce_scatter" || op == "all_to_all") return double(p - 1) / p;
  return 1.0;
}

// Which algorithms each op can run. "baseline": memcpy of the bytes + barrier (a lower bound on
// one copy); "peercopy" (local backend): write the buffer, barrier, copy the next rank's buffer,
// barrier: the bytes that must come from another core's cache.
std::vector<std::string> algos_for(const std::string& op, const std::string& wanted,
                                   bool peer_copy) {
  std::vector<std::string> all;
  if (op == "all_reduce" || op == "all_gather" || op == "reduce_scatter")
    all = {"auto", "native", "ring", "rd"};
  else if (op == "all_to_all" || op == "broadcast")
    all = {"auto", "native", "ring"};  // ring here: the send/recv version (pairwise / binomial)
  else
    all = {"auto"};
  if (op == "all_reduce") {
    all.push_back("baseline");
    if (peer_copy) all.push_back("peercopy");
  }
  if (wanted == "all") return all;
  std::vector<std::string> out;
  for (auto& a : all)
    if (a == wanted || a == "baseline" || a == "peercopy") out.push_back(a);
  if (out.empty() || out[0] == "baseline") out.insert(out.begin(), "auto");
  return out;
}

struct Row {
  std::string op, algo;
  size_t bytes;
  size_t count;
  double seconds;  // per call, the slowest rank's
};

// alpha + bytes / beta, fitted by least squares on relative error, so that the small sizes
// (latency) count as much as the large ones (bandwidth).
std::pair<double, double> fit_alpha_beta(const std::vector<Row>& rows) {
  double s00 = 0, s01 = 0, s11 = 0, r0 = 0, r1 = 0;
  for (const Row& r : rows) {
    const double w = 1.0 / (r.seconds * r.seconds), x = double(r.bytes);
    s00 += w;
    s01 += w * x;
    s11 += w * x * x;
    r0 += w * r.seconds;
    r1 += w * x * r.seconds;
  }
  const double det = s00 * s11 - s01 * s01;
  double alpha = det != 0 ? (r0 * s11 - r1 * s01) / det : 0;
  double slope = det != 0 ? (s00 * r1 - s01 * r0) / det : 0;
  if (alpha < 0) {  // refit through the origin
    alpha = 0;
    slope = s11 > 0 ? r1 / s11 : 0;
  }
  if (!(slope > 0) && !rows.empty()) {
    // Noise beat the slope (a loaded or busy machine, few sizes): the best bandwidth seen, and
    // what the smallest size's best time leaves for alpha. A calibration needs a positive beta.
    slope = rows[0].seconds / double(std::max<size_t>(rows[0].bytes, 1));
    double least = rows[0].seconds, smallest = double(rows[0].bytes);
    for (const Row& r : rows) {
      slope = std::min(slope, r.seconds / double(std::max<size_t>(r.bytes, 1)));
      least = std::min(least, r.seconds);
      smallest = std::min(smallest, double(r.bytes));
    }
    alpha = std::max(least - smallest * slope, 0.0);
  }
  const double beta_gbps = slope > 0 ? 1.0 / slope / 1e9 : 0.0;
  return {alpha, beta_gbps};
}

int iterations(const Options& o, size_t bytes) {
  if (o.iters > 0) return o.iters;
  // About 0.1 s per point at a guessed 10 us + 2 GB/s; the same count on every rank.
  const double est = 10e-6 + double(bytes) / 2e9;
  return static_cast<int>(std::clamp(0.1 / est, 3.0, 2000.0));
}

// One measurement on all ranks; returns the slowest rank's seconds per call.
// peer_a: the next rank's buffer `a` (local backend: ranks share the address space), or null.
double measure(const Group& g, const std::string& op, const std::string& algo, size_t bytes,
               DType dtype, int iters, std::vector<char>& a, std::vector<char>& b,
               const char* peer_a) {
  const int p = g.size(), r = g.rank();
  const size_t elem = dtype_size(dtype);
  const bool baseline = algo == "baseline" || algo == "peercopy";
  Algorithm al =
      algo == "auto" || baseline ? Algorithm::Auto : comm::parse_algorithm(algo, "--algo");
  // all_to_all and broadcast pick their send/recv versions through the group's options.
  comm::CommOptions saved = g.options(), opts = saved;
  if (op == "all_to_all" || op == "broadcast") opts.algorithm = al;
  g.set_options(opts);
  std::vector<size_t> counts(p, bytes / elem / p);
  auto once = [&] {
    if (algo == "baseline") {
      std::memcpy(b.data(), a.data(), bytes);
      g.barrier();
    } else if (algo == "peercopy") {
      std::memset(a.data(), 0, bytes);  // the producer's write, as all_reduce writes its output
      g.barrier();
      std::memcpy(b.data(), peer_a, bytes);
      g.barrier();
    } else if (op == "all_reduce") {
      g.all_reduce(a.data(), bytes / elem, dtype, comm::ReduceOp::Sum, al);
    } else if (op == "all_gather") {
      g.all_gather(a.data(), b.data(), bytes / elem / p, dtype, al);
    } else if (op == "reduce_scatter") {
      g.reduce_scatter(a.data(), b.data(), bytes / elem / p, dtype, comm::ReduceOp::Sum, al);
    } else if (op == "all_to_all") {
      g.all_to_all(a.data(), counts, b.data(), counts, dtype);
    } else if (op == "broadcast") {
      g.broadcast(a.data(), bytes / elem, dtype, 0);
    } else {  // sendrecv: a ring, each rank to the next
      g.send(a.data(), bytes, (r + 1) % p, 0);
      g.recv(b.data(), bytes, (r + p - 1) % p, 0);
    }
  };
  for (int i = 0; i < std::min(iters, 5); ++i) once();
  g.barrier();
  Timer t;
  for (int i = 0; i < iters; ++i) once();
  float secs = static_cast<float>(t.seconds() / iters);
  g.set_options(saved);
  g.all_reduce(&secs, 1, comm::ReduceOp::Max);
  return secs;
}

// Arrival skew. A TP group's ranks start a slice of work together (the collective before it) and
// meet again at the next collective, which waits for the slowest. Where cores run at different
// speeds from moment to moment (a VM's other tenants, SMT siblings, clocks), the slowest ends
// later than the average rank by a share of the slice that the back-to-back collectives above
// cannot see. The probe starts the same slice on every rank with a barrier, each rank timing its
// own, `rounds` times, for two kinds of slice: streaming (a GEMV over 24 MiB of bf16 weights of
// the rank's own, read from memory as decode at batch 1 reads its layers) and arithmetic (the
// same product at 8 rows on 256 KiB of weights that stay in the core's cache, repeated to the
// streaming slice's length). For each kind: the mean over rounds of (slowest - mean) / mean.
struct Skew {
  double stream = 0, compute = 0;        // fractions of a slice
  double stream_ms = 0, compute_ms = 0;  // the mean rank's slice
};

// The probes' work (the skew's slices, --load's computing): bf16 weights [n, kProbeK] of small
// normal-range values (bit patterns of numbers near 0.01), not NaNs or denormals; the arithmetic
// slice multiplies kProbeRows rows by kProbeCachedN of them, 256 KiB that stay in the core's cache.
constexpr int64_t kProbeK = 2048, kProbeCachedN = 64, kProbeRows = 8;
constexpr int64_t kProbeStreamN = 6144;  // the streaming slice: 24 MiB of bf16 weights
Tensor probe_weights(int64_t n) {
  Tensor w = Tensor::empty(DType::BF16, {n, kProbeK});
  auto* p = w.data<uint16_t>();
  for (int64_t i = 0; i < w.numel(); ++i) p[i] = uint16_t(0x3c20 + (i * 7919 % 64));
  return w;
}

Skew skew_probe(const Group& g, int rounds, int threads) {
  ThreadPool pool(threads);
  ScopedPool scoped(pool);
  const int64_t K = kProbeK, Ns = kProbeStreamN, Nc = kProbeCachedN, Tc = kProbeRows;
  const Tensor ws = probe_weights(Ns), wc = probe_weights(Nc);
  std::vector<float> x(Tc * K, 0.5f), y(std::max(Ns, Tc * Nc));
  auto stream = [&] { kernels::matmul(x.data(), 1, ws, y.data()); };
  // The arithmetic slice repeats its product as often as the streaming slice takes (the same
  // count on every rank: the slowest's estimate).
  stream();
  Timer t0;
  stream();
  const double stream_s = t0.seconds();
  kernels::matmul(x.data(), Tc, wc, y.data());
  Timer t1;
  kernels::matmul(x.data(), Tc, wc, y.data());
  float reps = static_cast<float>(std::ceil(stream_s / std::max(t1.seconds(), 1e-7)));
  g.all_reduce(&reps, 1, comm::ReduceOp::Max);
  auto compute = [&] {
    for (int i = 0; i < int(reps); ++i) kernels::matmul(x.data(), Tc, wc, y.data());
  };
  const int warm = std::min(5, rounds / 4);
  Skew out;
  for (int kind = 0; kind < 2; ++kind) {
    std::vector<float> mine(rounds), all(size_t(rounds) * g.size());
    for (int i = 0; i < warm + rounds; ++i) {
      g.barrier();
      Timer t;
      if (kind == 0)
        stream();
      else
        compute();
      if (i >= warm) mine[i - warm] = static_cast<float>(t.seconds());
    }
    g.all_gather(mine.data(), all.data(), rounds, DType::F32);
    double frac = 0, slice = 0;
    for (int i = 0; i < rounds; ++i) {
      double mx = 0, sum = 0;
      for (int r = 0; r < g.size(); ++r) {
        mx = std::max(mx, double(all[size_t(r) * rounds + i]));
        sum += all[size_t(r) * rounds + i];
      }
      const double mean = sum / g.size();
      frac += (mx - mean) / mean;
      slice += mean;
    }
    (kind == 0 ? out.stream : out.compute) = frac / rounds;
    (kind == 0 ? out.stream_ms : out.compute_ms) = slice / rounds * 1e3;
  }
  return out;
}

// --load: `threads` threads of this rank repeating the skew probe's arithmetic product on cached
// weights (a training step's matmuls, as the backward runs them beside the DP buckets'
// all-reduces) until stopped, counting the products done.
class Load {
 public:
  explicit Load(int threads) : threads_(threads), w_(probe_weights(kProbeCachedN)) {}
  ~Load() { stop(); }
  void start() {
    stop_ = false;
    done_ = 0;
    t0_ = now_seconds();
    for (int i = 0; i < threads_; ++i)
      workers_.emplace_back([this] {
        ThreadPool pool(1);  // each its own: kernels find it through ThreadPool::current()
        ScopedPool scoped(pool);
        std::vector<float> x(kProbeRows * kProbeK, 0.5f), y(kProbeRows * kProbeCachedN);
        while (!stop_.load(std::memory_order_relaxed)) {
          kernels::matmul(x.data(), kProbeRows, w_, y.data());
          done_.fetch_add(1, std::memory_order_relaxed);
        }
      });
  }
  // Counts from now on (the products done so far dropped).
  void mark() {
    done_ = 0;
    t0_ = now_seconds();
  }
  // Stops the threads; products a second since start() or mark().
  double stop() {
    if (workers_.empty()) return 0;
    stop_ = true;
    for (auto& w : workers_) w.join();
    workers_.clear();
    return double(done_.load()) / std::max(now_seconds() - t0_, 1e-9);
  }

 private:
  int threads_;
  Tensor w_;
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> done_{0};
  double t0_ = 0;
};

// Core sharing (--share-probe G). Where a machine holds more ranks than cores (an emulated cluster
// on a small machine: TP=2 x PP=2, four ranks on two cores), the ranks take turns, and a TP
// group's collective completes only when all its ranks hold a core at once; the scheduler places
// each core's ranks on its own, so while two groups both have work, a rank that reaches a
// collective before its peer is scheduled waits (and yields) through time the cores would
// otherwise compute in. Processor sharing, which the planner's turns assume, has no such loss.
// The probe splits the world into groups of G consecutive ranks (world rank = tp + pp x TP: the
// TP groups), and times `rounds` of a decode-like slice, a 4-row GEMV over the skew probe's
// 24 MiB of bf16 weights then a 32 KiB all-reduce in the group (a micro-batch of 4 tokens of a
// 2048-wide hidden state), first for each group alone (the others asleep), then for all groups
// at once. Efficiency: what perfect sharing of `cores` would take, max(slowest group alone, sum
// of the groups alone x G / cores), over the time taken together (at most 1).
constexpr int kShareRounds = 40;
struct Sharing {
  int groups = 0, group_size = 0, cores = 0;
  double alone_ms = 0, together_ms = 0, efficiency = 0;  // ms a round: the groups' sum; all at once
};

Sharing share_probe(const Group& g, int group_size, int cores, int rounds) {
  Sharing out;
  out.group_size = group_size;
  out.groups = g.size() / group_size;
  out.cores = cores;
  const int mine = g.rank() / group_size;
  const Group sub = g.split(mine, g.rank(), "share probe");
  ThreadPool pool(1);
  ScopedPool scoped(pool);
  constexpr int64_t kRows = 4, kHidden = 8192;  // 32 KiB of f32 a round
  const Tensor w = probe_weights(kProbeStreamN);
  std::vector<float> x(kRows * kProbeK, 0.5f), y(kRows * kProbeStreamN), h(kHidden, 1.0f);
  auto rounds_of = [&](int n) {
    for (int i = 0; i < n; ++i) {
      kernels::matmul(x.data(), kRows, w, y.data());
      sub.all_reduce(h.data(), kHidden, comm::ReduceOp::Sum);
      std::fill(h.begin(), h.end(), 1.0f);  // keeps the sums finite
    }
  };
  // Warm-up, each group alone, timing its rounds: the slowest group's time a round is what the
  // idle groups sleep through below (1.5x, and 2 ms), so that a group alone has the cores to
  // itself, as the planner's stage times do, and not beside ranks polling in MPI.
  float per_round = 0;
  const int warm = std::max(2, rounds / 8);
  for (int k = 0; k < out.groups; ++k) {
    g.barrier();
    if (mine == k) {
      Timer t;
      rounds_of(warm);
      per_round = std::max(per_round, static_cast<float>(t.seconds() / warm));
    }
  }
  g.all_reduce(&per_round, 1, comm::ReduceOp::Max);
  auto timed = [&](bool run_here) {
    g.barrier();
    Timer t;
    if (run_here)
      rounds_of(rounds);
    else
      std::this_thread::sleep_for(std::chrono::duration<double>(1.5 * per_round * rounds + 2e-3));
    float secs = run_here ? static_cast<float>(t.seconds()) : 0.0f;
    g.all_reduce(&secs, 1, comm::ReduceOp::Max);
    return double(secs);
  };
  double sum = 0, slowest = 0;
  for (int k = 0; k < out.groups; ++k) {
    const double t = timed(mine == k);
    sum += t;
    slowest = std::max(slowest, t);
  }
  const double together = timed(true);
  const double ideal = std::max(slowest, sum * group_size / std::max(cores, 1));
  out.alone_ms = sum / rounds * 1e3;
  out.together_ms = together / rounds * 1e3;
  out.efficiency = std::min(1.0, ideal / std::max(together, 1e-9));
  return out;
}

int run(const Options& o) {
  const std::vector<std::string> all_ops = {"all_reduce", "all_gather", "reduce_scatter",
                                            "all_to_all", "broadcast",  "sendrecv"};
  std::vector<std::string> ops;
  if (o.op == "all")
    ops = all_ops;
  else
    ops = {o.op};
  const size_t lo = std::max<size_t>(o.min_bytes, 1);
  const size_t hi = o.max_bytes;
  if (hi < lo)
    fail("bench comm", "--max-bytes ", human(hi), " is below --min-bytes ", human(lo));
  if (o.factor < 2) fail("bench comm", "--step-factor must be >= 2, got ", o.factor);
  const DType dtype = parse_dtype(o.dtype, "--dtype");
  const int world = comm::under_mpirun() && o.backend != "local" ? comm::launched_size() : o.ranks;
  if (world < 2) fail("bench comm", "--ranks must be >= 2 (a collective needs peers), got ", world);
  if (o.share_group > 0 && (world % o.share_group != 0 || world / o.share_group < 2))
    fail("bench comm", "--share-probe ", o.share_group, ": the ", world,
         " ranks must split into two or more groups of that size");

  comm::LaunchOptions lo_opts;
  lo_opts.backend = o.backend;
  lo_opts.timeout_s = o.timeout_s;
  lo_opts.print_stats = o.comm_stats;
  std::vector<Row> rows;
  std::string backend;
  Skew skew;
  Sharing sharing;
  double load_speed = 0;  // --load: the products' rate beside the collectives / alone
  comm::launch(world, lo_opts, [&](Group g) {
    const bool root = g.rank() == 0;
    const int p = g.size();
    const size_t elem = dtype_size(dtype);
    std::vector<char> a(hi + 64, 1), b(hi * 2 + 64, 0);
    // Real numbers (not bit patterns of NaNs) for the reductions.
    const float one = 1.0f;
    for (size_t i = 0; i + elem <= a.size(); i += elem)
      convert(&one, DType::F32, a.data() + i, dtype, 1);
    // Local ranks are threads of one process: exchange the addresses of `a` for the peer copy.
    const char* peer_a = nullptr;
    if (g.backend() == "local") {
      std::vector<uint64_t> addrs(p);
      const uint64_t mine = reinterpret_cast<uintptr_t>(a.data());
      g.all_gather(&mine, addrs.data(), 2, DType::F32);  // 8 bytes, copied as they are
      peer_a = reinterpret_cast<const char*>(static_cast<uintptr_t>(addrs[(g.rank() + 1) % p]));
    }
    if (root) {
      backend = std::string(g.backend());
      std::printf("# parallm bench comm: backend %s, %d ranks, dtype %s, %d hardware threads\n",
                  backend.c_str(), p, dtype_name(dtype).data(),
                  static_cast<int>(std::thread::hardware_concurrency()));
      std::printf("# %-14s %9s %10s %-9s %11s %11s %11s\n", "op", "size", "count", "algo",
                  "time(us)", "algbw(GB/s)", "busbw(GB/s)");
    }
    // Each op's sizes: every rank needs a whole number of elements per rank for the block ops.
    auto sizes = [&](const std::string& op) {
      const size_t unit =
          (op == "all_reduce" || op == "broadcast" || op == "sendrecv") ? elem : elem * p;
      std::vector<size_t> out;
      for (size_t bytes = lo; bytes <= hi; bytes *= o.factor)
        if (bytes / unit * unit > 0) out.push_back(bytes / unit * unit);
      return out;
    };
    // A row of the table (rank 0): `algo` its key in `rows`, `shown` what the table says.
    auto row = [&](const std::string& op, const std::string& algo, const char* shown, size_t n,
                   double s) {
      if (!root) return;
      rows.push_back({op, algo, n, n / elem, s});
      const double algbw = n / s / 1e9;
      std::printf("  %-14s %9s %10zu %-9s %11.2f %11.3f %11.3f\n", op.c_str(), human(n).c_str(),
                  n / elem, shown, s * 1e6, algbw, algbw * bus_factor(op, p));
      std::fflush(stdout);
    };
    for (const std::string& op : ops)
      for (size_t n : sizes(op))
        for (const std::string& algo : algos_for(op, o.algo, peer_a != nullptr))
          row(op, algo,
              algo == "baseline"   ? "memcpy+barrier"
              : algo == "peercopy" ? "peer-copy+2barriers"
                                   : algo.c_str(),
              n, measure(g, op, algo, n, dtype, iterations(o, n), a, b, peer_a));
    if (o.load > 0) {
      // Every rank's load alone for a moment (all at once, as they run in a training step),
      // then beside each op's auto algorithm at every size.
      Load load(o.load);
      g.barrier();
      load.start();
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      const double alone = load.stop();
      g.barrier();
      load.start();
      std::string last_op;
      size_t last_n = 0;
      double last_s = 0;
      for (const std::string& op : ops)
        for (size_t n : sizes(op)) {
          const double s = measure(g, op, "auto", n, dtype, iterations(o, n), a, b, peer_a);
          last_op = op, last_n = n, last_s = s;  // s: the slowest rank's, the same on every rank
          row(op, "loaded", "loaded", n, s);
        }
      // The computing's speed over a window of its own, a third of a second of the last row's
      // collective back to back (the sweep may be over in a millisecond); the slowest rank's
      // (the minimum, as the maximum of the negatives).
      load.mark();
      if (!last_op.empty()) {
        const int calls =
            static_cast<int>(std::clamp(std::ceil(0.3 / std::max(last_s, 1e-7)), 3.0, 1e6));
        measure(g, last_op, "auto", last_n, dtype, calls, a, b, peer_a);
      }
      float speed = -static_cast<float>(load.stop() / std::max(alone, 1e-9));
      g.all_reduce(&speed, 1, comm::ReduceOp::Max);
      // Never above 1: the computing cannot run faster beside the collectives than alone; a
      // ratio above it is the alone window's noise (seen on a loaded 2-core machine).
      speed = std::min(-speed, 1.0f);
      if (root) load_speed = speed;
    }
    if (o.skew_rounds > 0) {
      const Skew sk = skew_probe(g, o.skew_rounds, o.threads);
      if (root) skew = sk;
    }
    if (o.share_group > 0) {
      const int cores =
          o.share_cores > 0 ? o.share_cores : static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
      const Sharing sh = share_probe(g, o.share_group, cores, kShareRounds);
      if (root) sharing = sh;
    }
  });
  if (comm::launched_rank() != 0) return 0;

  auto find = [&](const std::string& op, const std::string& algo, size_t bytes) -> double {
    for (const Row& r : rows)
      if (r.op == op && r.algo == algo && r.bytes == bytes) return r.seconds;
    return 0;
  };
  // The goals, as ratios measured in this run.
  if (std::find(ops.begin(), ops.end(), "all_reduce") != ops.end()) {
    const double ar = find("all_reduce", "auto", 16384),
                 base = find("all_reduce", "baseline", 16384),
                 peer = find("all_reduce", "peercopy", 16384);
    if (ar > 0 && base > 0)
      std::printf(
          "# goal: all_reduce 16K (auto) / (memcpy 16K + barrier) = %.2f (target <= 2 on "
          "the local backend)\n",
          ar / base);
    if (ar > 0 && peer > 0)
      std::printf(
          "#       all_reduce 16K (auto) / (copy 16K from another core + 2 barriers) = %.2f\n",
          ar / peer);
    for (size_t bytes = 1 << 20; bytes <= hi; bytes *= 4) {
      const double ring = find("all_reduce", "ring", bytes),
                   native = find("all_reduce", "native", bytes);
      if (ring > 0 && native > 0)
        std::printf("# goal: all_reduce %s ring / native = %.2f (target <= 1.2 over MPI)\n",
                    human(bytes).c_str(), ring / native);
    }
  }
  nlohmann::json j;
  j["backend"] = backend;
  j["world"] = world;
  // Each op's alpha-beta fit over the rows of `algo`, printed, as the calibration's "ops".
  auto fit_ops = [&](const char* algo) {
    nlohmann::json fitted = nlohmann::json::object();
    for (const std::string& op : ops) {
      std::vector<Row> pts;
      for (const Row& r : rows)
        if (r.op == op && r.algo == algo) pts.push_back(r);
      if (pts.size() < 2) continue;
      auto [alpha, beta] = fit_alpha_beta(pts);
      fitted[op] = {{"alpha_us", alpha * 1e6}, {"beta_gbps", beta}};
      std::printf("#   %-14s alpha %8.2f us   beta %8.3f GB/s\n", op.c_str(), alpha * 1e6, beta);
    }
    return fitted;
  };
  std::printf("# alpha-beta fit (time = alpha + bytes / beta) of the auto algorithm:\n");
  j["ops"] = fit_ops("auto");
  if (o.load > 0) {
    std::printf(
        "# beside compute (--load %d: %d thread%s a rank computing): the load ran at "
        "%.2f of its speed alone; loaded rows' fit:\n",
        o.load, o.load, o.load == 1 ? "" : "s", load_speed);
    j["beside_compute"] = {
        {"threads", o.load}, {"compute_speed", load_speed}, {"ops", fit_ops("loaded")}};
  }
  if (o.skew_rounds > 0) {
    j["arrival_skew"] = {{"ranks", world},
                         {"stream", skew.stream},
                         {"compute", skew.compute},
                         {"stream_ms", skew.stream_ms},
                         {"compute_ms", skew.compute_ms}};
    std::printf(
        "# arrival skew (%d ranks, %d rounds, %d thread%s a rank): the slowest rank ends a slice "
        "%.1f%% after the mean streaming (%.2f ms slices), %.1f%% computing (%.2f ms)\n",
        world, o.skew_rounds, o.threads, o.threads == 1 ? "" : "s", 100 * skew.stream,
        skew.stream_ms, 100 * skew.compute, skew.compute_ms);
  }
  if (o.share_group > 0) {
    j["core_sharing"] = {{"groups", sharing.groups},
                         {"group_size", sharing.group_size},
                         {"cores", sharing.cores},
                         {"alone_ms", sharing.alone_ms},
                         {"together_ms", sharing.together_ms},
                         {"efficiency", sharing.efficiency}};
    std::printf(
        "# core sharing (%d groups of %d ranks on %d cores, %d rounds of a 24 MiB GEMV and a "
        "32 KiB all-reduce): %.2f ms a round in turn, %.2f ms all at once, efficiency %.2f\n",
        sharing.groups, sharing.group_size, sharing.cores, kShareRounds, sharing.alone_ms,
        sharing.together_ms, sharing.efficiency);
  }
  std::printf("%s\n", j.dump().c_str());
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    if (!f) fail<std::runtime_error>("bench comm", "--json: cannot write \"", o.json, "\"");
    f << j.dump(2) << "\n";
  }
  return 0;
}

const bool registered = register_command(
    {"bench comm", "Collective latency and bandwidth per size and algorithm (nccl-tests style)",
     [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       app.add_option("--backend", o->backend, "auto (mpi under mpirun, else local), local, mpi")
           ->check(CLI::IsMember({"auto", "local", "mpi"}));
       app.add_option("--ranks", o->ranks, "Ranks (threads) for the local backend")
           ->check(CLI::Range(2, 1024));
       app.add_option("--op", o->op,
                      "all, all_reduce, all_gather, reduce_scatter, all_to_all, "
                      "broadcast, sendrecv")
           ->check(CLI::IsMember({"all", "all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                                  "broadcast", "sendrecv"}));
       app.add_option("--algo", o->algo, "all, auto, native, ring, rd")
           ->check(CLI::IsMember({"all", "auto", "native", "ring", "rd"}));
       // Sizes in bytes, or with a unit of 1024s: 64K, 1M, 2MiB, 1G (CLI11 parses them and names
       // the flag and value it rejects). CLI11 runs the transform added last first: the sign check
       // sees the text before AsSizeValue, whose unsigned parse would wrap "-5" around.
       const CLI::Validator not_negative(
           [](std::string& v) {
             return v.find('-') != std::string::npos
                        ? "\"" + v + "\" is negative: a size is bytes, or with K, M, G"
                        : std::string();
           },
           "");
       app.add_option("--min-bytes", o->min_bytes, "Smallest size (default 4)")
           ->transform(CLI::AsSizeValue(false))
           ->transform(not_negative);
       app.add_option("--max-bytes", o->max_bytes, "Largest size (default 64M)")
           ->transform(CLI::AsSizeValue(false))
           ->transform(not_negative);
       app.add_option("--step-factor", o->factor, "Size multiplier between points (default 2)");
       app.add_option("--iters", o->iters, "Timed calls per point (default: by size)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--dtype", o->dtype, "f32, bf16, f16");
       app.add_option("--json", o->json, "Write the alpha/beta fit to this file");
       app.add_option("--comm-timeout", o->timeout_s, "Seconds before a blocked call fails")
           ->check(CLI::PositiveNumber);
       app.add_flag("--comm-stats", o->comm_stats, "Print the comm statistics table at exit");
       app.add_option("--skew-rounds", o->skew_rounds,
                      "Rounds of the arrival-skew probe (default 60; 0: none): the ranks run "
                      "the same slice of work from a barrier, and the JSON's arrival_skew is how "
                      "much later than the mean the slowest ends")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--share-probe", o->share_group,
                      "Then the core-sharing probe over groups of G consecutive ranks (the TP "
                      "groups): a decode-like slice and all-reduce per round, each group alone, "
                      "then all at once; the JSON's core_sharing.efficiency is what perfect "
                      "sharing of the cores would take over the time taken (default 0: none)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--share-cores", o->share_cores,
                      "Cores the ranks share, for --share-probe (default: the online CPUs)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--threads", o->threads, "Threads per rank for the probe (default 1)")
           ->check(CLI::Range(1, 1024));
       app.add_option("--load", o->load,
                      "Then each op again while N threads a rank compute beside it (a training "
                      "step's matmuls beside its DP gradient all-reduces): rows 'loaded', and the "
                      "JSON's beside_compute (their fit, and compute_speed: what the computing "
                      "kept of its speed alone) for plan --train (default 0: none)")
           ->check(CLI::Range(0, 1024));
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
