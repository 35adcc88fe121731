#include "parallm/plan/estimate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "parallm/core/error.h"
#include "parallm/kernels/matmul.h"
#include "parallm/pipeline/simulator.h"
#include "parallm/plan/model_presets.h"
#include "parallm/plan/moe.h"

namespace parallm::plan {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string gib(double b) {
  return fmt::format("{:.1f} GiB", b / kGiB);
}
std::string us(double s) {
  return fmt::format("{:.1f} us", s * 1e6);
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The DP gradient buckets under the last backward (train/dp.cpp): a backward of `tb` seconds
// makes B equal buckets, bucket i when it is (i+1)/B done; one thread reduces them in order,
// starting each as soon as it is ready and the one before is done. A bucket takes `one` seconds
// alone and `beside` seconds beside the backward, which meanwhile runs at `speed` of its own
// (1 and one: a free overlap). Returns the seconds the step gains over the backward alone: until
// both the backward and the last reduction are done.
double overlapped_reduction(double tb, double one, double beside, int B, double speed) {
  beside = std::max(beside, 1e-12);
  double t = 0, done = 0;  // time; how much of the backward is done (seconds at full speed)
  double bwd_end = -1;
  for (int i = 0; i < B; ++i) {
    const double ready = tb * (i + 1) / B;
    if (done < ready) {  // the thread waits for bucket i: the backward at full speed
      t += ready - done;
      done = ready;
    }
    // Bucket i from t: beside the backward until one of the two ends, then alone.
    double left = 1;  // of the bucket's reduction
    if (done < tb) {
      const double x = std::min(left * beside, (tb - done) / speed);
      t += x;
      done = std::min(tb, done + x * speed);
      left = std::max(0.0, left - x / beside);
      if (done >= tb) bwd_end = t;
    }
    t += left * one;
  }
  if (bwd_end < 0) bwd_end = t + (tb - done);
  return std::max(bwd_end, t) - tb;
}

bool slow_for_tp(const LinkSpec& l) {
  return l.kind == LinkKind::PCIe || l.kind == LinkKind::Network;
}

// The ranks of each kind of group, for the link that bounds it.
std::vector<int> tp_group(const Layout& l, int d, int p) {
  std::vector<int> r;
  for (int t = 0; t < l.tp; ++t) r.push_back(l.global_rank(t, d, p));
  return r;
}
std::vector<int> dp_group(const Layout& l, int first, int count) {
  std::vector<int> r;
  for (int d = first; d < first + count; ++d) r.push_back(l.global_rank(0, d, 0));
  return r;
}

const LinkSpec& worst(const LinkSpec& a, const LinkSpec& b) {
  if (b.bandwidth < a.bandwidth || (b.bandwidth == a.bandwidth && b.latency > a.latency)) return b;
  return a;
}

struct Links {
  const LinkSpec* tp;
  const LinkSpec* dp;
  const LinkSpec* ep;
  std::vector<const LinkSpec*> pp;  // [boundary s -> s+1]
  const LinkSpec* pp_return;        // last stage -> first stage
  // The engine's --pp-split auto (engine/runtime.h): with every TP group inside a node and the
  // pipeline across nodes, inference activations cross between stages in 1/TP blocks, which the
  // next stage's TP group all-gathers.
  bool split_hops = false;
};

Links find_links(const ClusterSpec& cl, const Layout& l) {
  Links k;
  k.tp = &cl.group_link(tp_group(l, 0, 0));
  for (int p = 0; p < l.pp; ++p)
    for (int d = 0; d < l.dp; ++d) k.tp = &worst(*k.tp, cl.group_link(tp_group(l, d, p)));
  k.dp = &cl.group_link(dp_group(l, 0, l.dp));
  // Experts over TP: the MoE all-reduce runs over the TP group itself.
  k.ep = l.experts_over_tp ? k.tp : &cl.group_link(dp_group(l, 0, l.ep));
  for (int s = 0; s + 1 < l.pp; ++s)
    k.pp.push_back(&cl.link_between(l.global_rank(0, 0, s), l.global_rank(0, 0, s + 1)));
  k.pp_return = &cl.link_between(l.global_rank(0, 0, l.pp - 1), 0);
  bool tp_in_nodes = true, pp_across = false;
  for (int d = 0; d < l.dp; ++d)
    for (int p = 0; p < l.pp; ++p) {
      const std::vector<int> g = tp_group(l, d, p);
      for (int r : g) tp_in_nodes = tp_in_nodes && cl.node_of(r) == cl.node_of(g[0]);
      pp_across = pp_across || cl.node_of(g[0]) != cl.node_of(l.global_rank(0, d, 0));
    }
  k.split_hops = l.tp > 1 && l.pp > 1 && tp_in_nodes && pp_across;
  return k;
}

// One micro-batch's activations (`bytes`, replicated over the TP group) from stage s to s + 1.
// Split (Links::split_hops): each TP rank sends its 1/TP block, then the next stage all-gathers.
// A GPU has its own network port (LinkSpec: bandwidth per device), so the blocks cross side by
// side; a CPU node's ranks share the node's port, so theirs queue on it and the rows cross once
// (where unsplit they would cross TP times). idle: as collective_cost's idle_before.
CommCost pp_hop_cost(const ClusterSpec& cl, const Layout& l, const Links& k, int s, double bytes,
                     const Calibration* cal, double idle = 0) {
  if (!k.split_hops) return collective_cost(Collective::P2P, bytes, 2, *k.pp[s], cal, idle);
  CommCost c = collective_cost(Collective::P2P, cl.device.is_cpu ? bytes : bytes / l.tp, 2,
                               *k.pp[s], cal, idle);
  c.seconds += collective_cost(Collective::AllGather, bytes, l.tp, *k.tp, cal).seconds;
  c.bytes_sent = bytes / l.tp;
  return c;
}

struct Rates {
  double flops;
  double bw;
  // CPU ranks stream the weights and multiply them in the same loop and overlap the two only in
  // part: a decode step costs the bytes plus the FLOPs, not the larger of them (measured on one
  // rank, TinyLlama layers in bf16: 11.2, 12.6, 15.8 and 20.8 ms at batch 1, 2, 4 and 8 lie on
  // a line, 9.8 ms + 1.37 ms a sequence, where the larger of the two would be flat to batch 8).
  // Accelerators keep the roofline, the larger of the two.
  bool additive = false;
  // CPU: bytes/s of the GEMV's further passes over the weights from cache (PlanOptions::reread_bw;
  // 0: free). The line above holds within a chunk of 4 tokens; each further chunk passes over the
  // weights again (Zen 5, 2026-12-03, same shape, one thread: 11.8-12.5, 16.5-17.0, 20.2-21.2
  // and 24.5-26.5 ms at batch 1, 4, 5 and 8: 1.5 ms a sequence, and 2.2 ms more at the fifth).
  double reread = 0;
};

const Calibration* cal_of(const PlanOptions& o) {
  return o.calibration ? &*o.calibration : nullptr;
}

// One device of one stage doing one step for n sequences of `tokens` new tokens each, attending
// over `ctx` positions (decode: tokens 1; prefill: tokens = ctx = prompt).
struct StageCost {
  double flops_time = 0, mem_time = 0;
  bool additive = false;  // Rates::additive
  double roofline() const {
    return additive ? flops_time + mem_time : std::max(flops_time, mem_time);
  }
  CostTerm tp_ar, tp_embed, tp_logits, tp_skew, ep_a2a, ep_ar;
  double comm() const {
    return tp_ar.seconds + tp_embed.seconds + tp_logits.seconds + tp_skew.seconds + ep_a2a.seconds +
           ep_ar.seconds;
  }
  double total() const { return roofline() + comm(); }
  double sent = 0;  // bytes this device sends
};

// E[max of n standard normal deviates] (0 for n = 1): how far the slowest of n ranks whose
// slice times vary independently ends after their mean, in standard deviations. The integral
// over a 1e-3 grid; group sizes up to 64 computed once (a search asks for them per stage).
double expected_max_normal(int n) {
  auto integral = [](int m) {
    if (m < 2) return 0.0;
    const double step = 1e-3;
    double sum = 0;
    for (double x = -10; x < 10; x += step) {
      const double pdf = std::exp(-x * x / 2) / std::sqrt(2 * M_PI);
      const double cdf = 0.5 * std::erfc(-x / std::sqrt(2.0));
      sum += x * m * pdf * std::pow(cdf, m - 1) * step;
    }
    return sum;
  };
  constexpr int kTable = 64;
  static const std::vector<double> table = [&] {
    std::vector<double> t(kTable + 1);
    for (int m = 0; m <= kTable; ++m) t[m] = integral(m);
    return t;
  }();
  return n <= kTable ? table[std::max(n, 0)] : integral(n);
}

StageCost stage_cost(const ModelConfig& c, const Layout& l, const InferenceWorkload& w,
                     const Links& k, const Rates& r, const Calibration* cal, int stage, double n,
                     double tokens, double ctx, bool prefill) {
  const StageParams P = stage_params(c, l, stage);
  const double h = double(c.hidden_size), T = n * tokens, ab = precision_bytes(w.activations);
  const double L = double(P.layers);
  StageCost s;
  s.additive = r.additive;
  // Memory traffic: the stage's weights once per step (experts only those the step's tokens reach;
  // the embedding only the rows looked up), the KV cache read (decode) or written (prefill).
  double touched = 1;
  if (c.is_moe()) {
    const double k_over_e = double(c.num_experts_per_tok) / double(c.num_local_experts);
    touched = 1 - std::pow(1 - k_over_e, T * l.ep);
  }
  // Tied embeddings on one stage: the table is streamed anyway, as the output projection.
  const bool tied_here = c.tie_word_embeddings && l.pp == 1;
  double weight_bytes = (P.dense() + P.experts * touched) * precision_bytes(w.weights);
  // The dense matrices every token of the step goes through (the embedding is looked up, not
  // multiplied; an expert sees only the tokens routed to it, rarely more than one chunk).
  const double matmul_bytes =
      (P.dense() - (stage == 0 && !tied_here ? P.embedding : 0.0)) * precision_bytes(w.weights);
  if (stage == 0 && !tied_here) weight_bytes += (T * h - P.embedding) * precision_bytes(w.weights);
  const double kv_tok = kv_bytes_per_token(c, l.tp, P.layers, w.kv_cache);
  const double kv_bytes = prefill ? T * kv_tok : n * ctx * kv_tok + T * kv_tok;
  s.mem_time = (weight_bytes + kv_bytes) / r.bw;
  // FLOPs: 2 per parameter per token through the linear layers (k experts per token for MoE), the
  // output projection for the last token only, and attention scores + values.
  // Routed experts in the sparse layers only (qwen2_moe has dense ones), at their own FFN width.
  const double expert_dev = 3 * h * double(c.expert_ffn()) / l.tp;
  const double L_moe = double(stage_moe_layers(c, l.pp, stage));
  const double mlp_tok = c.is_moe() ? P.mlp + L_moe * c.num_experts_per_tok * expert_dev : P.mlp;
  const double head_mat = stage == l.pp - 1 ? double(ceil_div(c.vocab_size, l.tp)) * h : 0.0;
  const double qd = double(c.q_dim()) / l.tp;
  const double attn_flops = prefill ? 2 * n * tokens * tokens * qd * L : 4 * n * ctx * qd * L;
  const double flops = 2 * T * (P.attention + mlp_tok + P.norms) + 2 * n * head_mat + attn_flops;
  s.flops_time = flops / r.flops;
  // CPU, 16/32-bit weights, fewer tokens than the GEMM takes: the GEMV's further passes over the
  // weights, from cache, one per further chunk of tokens (counted with the arithmetic).
  const bool float_weights =
      w.weights == Precision::FP32 || w.weights == Precision::BF16 || w.weights == Precision::FP16;
  if (r.reread > 0 && float_weights && T < double(kernels::kGemvMaxTokens)) {
    const double passes = std::ceil(T / double(kernels::kGemvTokenChunk)) - 1;
    s.flops_time += std::max(0.0, passes) * matmul_bytes / r.reread;
  }

  if (l.tp > 1) {
    // Each all-reduce follows a slice of the stage's compute (the layers' halves between them).
    const CommCost ar = collective_cost(Collective::AllReduce, T * h * ab, l.tp, *k.tp, cal,
                                        s.roofline() / (2 * L + 1));
    // Two per layer (attention, MLP); experts over TP: a sparse layer's MLP all-reduce is the MoE
    // all-reduce below instead, qwen2_moe's TP-split shared expert keeping its own.
    const double ars =
        l.experts_over_tp ? 2 * L - L_moe + (c.has_shared_expert() ? L_moe : 0) : 2 * L;
    s.tp_ar = {"tp all-reduce", int(ars), T * h * ab, ars * ar.seconds,
               cat(k.tp->name, ", ", ar.algorithm)};
    s.sent += ars * ar.bytes_sent;
    if (l.experts_over_tp && L_moe > 0) {
      // vLLM's layout (plan/moe.h): each sparse layer all-reduces the [T, k, H] f32 slots of
      // its tokens' expert outputs over the TP ranks, whatever the routing.
      const MoeAllReduceBytes mb = moe_all_reduce_step_bytes(c, l.tp, std::llround(T));
      const CommCost mar = collective_cost(Collective::AllReduce, mb.payload, l.tp, *k.tp, cal);
      s.ep_ar = {"ep=tp all-reduce", int(L_moe), mb.payload, L_moe * mar.seconds,
                 cat(k.tp->name, ", ", mar.algorithm, ", [T, k, H] f32")};
      s.sent += L_moe * mb.sent;
    }
    if (cal && cal->skew_share.ranks > 0) {
      // Arrival skew: every collective waits for the group's slowest rank, which ends its slice
      // of the stage's work a share of the slice after the mean rank (`bench comm`'s probe on
      // its ranks), the streaming and the arithmetic each at their own share; summed over the
      // slices, a share of the stage's work. Measured for the probe's ranks, scaled to the
      // group's by the expected maximum of normal deviates (x1.82 from 2 ranks to 4). Prefill's
      // longer slices too: the probe's share held at slices of 20-40 ms (2026-12-01, Zen 3 box).
      const auto& sk = cal->skew_share;
      const double scale = expected_max_normal(l.tp) / expected_max_normal(sk.ranks);
      const double wait = scale * (s.additive ? sk.stream * s.mem_time + sk.compute * s.flops_time
                                   : s.mem_time >= s.flops_time ? sk.stream * s.mem_time
                                                                : sk.compute * s.flops_time);
      s.tp_skew = {"tp arrival skew", 0, 0, wait,
                   fmt::format("the slowest of {} ranks: {:.1f}% of streaming, {:.1f}% of "
                               "matmuls",
                               l.tp, 100 * scale * sk.stream, 100 * scale * sk.compute)};
    }
    if (stage == 0) {  // vocab-parallel embedding: partial lookups summed
      s.tp_embed = {"tp embedding all-reduce", 1, T * h * ab, ar.seconds, s.tp_ar.detail};
      s.sent += ar.bytes_sent;
    }
    if (stage == l.pp - 1) {
      // Vocab-parallel sampling: each rank offers its best (value, index) per sequence and one
      // all-gather picks the winner; the logits themselves never travel.
      const double bytes = n * 2 * 4 * l.tp;
      const CommCost ag = collective_cost(Collective::AllGather, bytes, l.tp, *k.tp, cal);
      s.tp_logits = {"tp sampler all-gather", 1, bytes, ag.seconds,
                     cat(k.tp->name, ", ", ag.algorithm)};
      s.sent += ag.bytes_sent;
    }
    // The skew's waits, one at each of the stage's TP collectives.
    if (s.tp_skew.seconds > 0) s.tp_skew.count = s.tp_ar.count + (stage == 0) + (stage == l.pp - 1);
  }
  if (l.ep > 1) {
    // Dispatch to the experts and combine back, rows as MoeLayer sends them (plan/moe.h): a
    // dispatched row carries the hidden vector, its routing weight and expert id (4 bytes each),
    // a returned row the hidden vector; (EP-1)/EP of them leave the rank (collective_cost).
    const double rows = T * c.num_experts_per_tok;
    const double bytes = rows * (h * ab + 8), back = rows * h * ab;
    const CommCost a2a = collective_cost(Collective::AllToAll, bytes, l.ep, *k.ep, cal);
    const CommCost ret = collective_cost(Collective::AllToAll, back, l.ep, *k.ep, cal);
    s.ep_a2a = {"ep all-to-all", int(2 * L_moe), bytes, L_moe * (a2a.seconds + ret.seconds),
                cat(k.ep->name, ", ", a2a.algorithm)};
    s.sent += L_moe * (a2a.bytes_sent + ret.bytes_sent);
  }
  return s;
}

void add_term(std::vector<CostTerm>& terms, const CostTerm& t) {
  if (t.count == 0) return;
  for (CostTerm& e : terms) {
    if (e.name == t.name) {
      e.count += t.count;
      e.seconds += t.seconds;
      return;
    }
  }
  terms.push_back(t);
}

// The schedule a layout runs: interleaving needs more than one stage.
pipeline::ScheduleKind schedule_for(const Layout& l, const TrainingWorkload& w, int* chunks) {
  *chunks = l.pp > 1 && w.schedule == pipeline::ScheduleKind::Interleaved ? w.chunks : 1;
  if (l.pp == 1 && w.schedule == pipeline::ScheduleKind::Interleaved)
    return pipeline::ScheduleKind::OneFOneB;
  return w.schedule;
}

}  // namespace

std::string ms_text(double seconds) {
  return seconds < 0.01 ? fmt::format("{:.3f} ms", seconds * 1e3)
                        : fmt::format("{:.2f} ms", seconds * 1e3);
}

double rank_flops(const ClusterSpec& cl, const PlanOptions& o) {
  if (o.flops > 0) return o.flops;
  if (o.calibration && o.calibration->flops > 0) return o.calibration->flops;
  return cl.device.effective_flops();
}

double rank_mem_bw(const ClusterSpec& cl, const PlanOptions& o, double streaming) {
  double bw = 0;
  if (o.mem_bw > 0) {
    bw = o.mem_bw;
  } else if (o.calibration && o.calibration->mem_bw > 0) {
    bw = o.calibration->mem_bw;
  } else {
    if (!(cl.device.mem_bw > 0))
      fail("plan", "device \"", cl.device.name, "\" has no memory bandwidth: pass --mem-bw GBPS");
    bw = cl.device.effective_mem_bw();
  }
  if (!cl.device.shared_memory_bw) return bw;
  const double share = bw / std::max(1.0, streaming);
  const double alone = o.rank_mem_bw > 0 ? o.rank_mem_bw
                       : o.mem_bw > 0    ? 0.0  // given without a cap: none
                                         : cl.device.rank_mem_bw;
  return alone > 0 ? std::min(share, alone) : share;
}

std::string placement_problem(const ClusterSpec& cl, const Layout& l, const PlanOptions& o) {
  if (l.world() != cl.world())
    return cat(l.str(), " uses ", l.world(), " devices, the cluster has ", cl.world());
  if (o.tp_anywhere || l.tp == 1) return "";
  if (l.tp > cl.gpus_per_node)
    return cat("TP=", l.tp, " crosses nodes (", cl.gpus_per_node,
               " devices per node; TP stays in a node unless --tp-anywhere)");
  if (!cl.has_nvlink) return "";
  for (int r = 0; r < cl.world(); r += l.tp) {
    const int island = cl.island_of(r % cl.gpus_per_node);
    for (int t = 1; t < l.tp; ++t)
      if (island < 0 || cl.island_of((r + t) % cl.gpus_per_node) != island)
        return cat("TP=", l.tp, " leaves an NVLink island (largest island: ", cl.largest_island(),
                   " devices); TP over ", cl.pcie.name, " is allowed with --tp-anywhere");
  }
  return "";
}

double training_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  return 6 * active_params_per_token(c) +
         6.0 * double(c.num_hidden_layers) * double(c.q_dim()) * double(seq_len);
}

LayoutEstimate estimate_inference(const ModelConfig& c, const ClusterSpec& cl, const Layout& l,
                                  const InferenceWorkload& w, const PlanOptions& o) {
  if (std::string p = layout_problem(c, l); !p.empty()) fail("plan", p);
  if (l.world() != cl.world())
    fail("plan", l.str(), " uses ", l.world(), " devices but the cluster has ", cl.world());
  if (w.batch < 1 || w.prompt_len < 1 || w.output_len < 1)
    fail("plan", "batch, prompt and output lengths must be >= 1 (got ", w.batch, ", ", w.prompt_len,
         ", ", w.output_len, ")");
  LayoutEstimate e;
  e.layout = l;
  const Calibration* cal = cal_of(o);
  const Links k = find_links(cl, l);
  e.tp_link = l.tp > 1 ? k.tp->name : "-";
  e.pp_link = l.pp > 1
                  ? (*std::min_element(k.pp.begin(), k.pp.end(),
                                       [](auto a, auto b) { return a->bandwidth < b->bandwidth; }))
                        ->name
                  : "-";
  e.replica_batch = ceil_div(w.batch, l.dp);
  const int64_t b = e.replica_batch;
  e.micro_batches = l.pp > 1 ? int(std::min<int64_t>(b, l.pp)) : 1;
  const double n = double(ceil_div(b, e.micro_batches));
  // Ranks streaming memory at once on a node (matters where they share it, CPU nodes): with fewer
  // micro-batches than stages, only that many stages work at a time; ranks sharing fewer cores
  // (--shared-cores) take turns, and no more of them than the cores stream at once.
  const int cores = cl.device.is_cpu && o.shared_cores > 0 ? o.shared_cores : 0;
  int streaming = std::max(1, std::min(l.world(), cl.gpus_per_node) * e.micro_batches / l.pp);
  if (cores > 0) streaming = std::min(streaming, cores);
  // Of those, a TP group's ranks run the same matmuls at the same moment and stream together;
  // the others (another stage's, another replica's) keep their own clocks and stream only a part
  // u of their step, the rest being arithmetic and waits. A rank then shares the node with its
  // group and, on the average, u of each other rank (decode below finds u). Measured on a 2-core
  // node (2026-12-01): two one-rank runs at once took 0.99-1.07x one alone at batch 8 (1.36x
  // once) and 1.14-1.28x at batch 4, where sharing all the time gives 1.05-1.19x and 1.08-1.34x;
  // PP=2 at batch 8 ran 22% faster than sharing all the time predicts, 9% with u (5 runs).
  const int lockstep = std::min(l.tp, streaming), apart = streaming - lockstep;
  Rates r{rank_flops(cl, o), rank_mem_bw(cl, o, streaming), cl.device.is_cpu,
          cl.device.is_cpu ? o.reread_bw : 0.0};
  const double h = double(c.hidden_size), ab = precision_bytes(w.activations);

  // Memory: the fullest stage.
  for (int s = 0; s < l.pp; ++s) {
    const MemoryBreakdown m = inference_memory(c, l, w, s, b, int64_t(n));
    if (s == 0 || m.total() > e.memory.total()) e.memory = m;
  }
  e.capacity = cl.device.usable_memory();
  e.fits = e.memory.total() <= e.capacity;

  // Decode: one token of every sequence. A micro-batch crosses the stages in turn; with m
  // micro-batches a stage serves them one after another, and so does a link between two stages
  // (its messages queue on it), so the step takes the longest of the path, m times the slowest
  // stage and m times the slowest hop.
  const double ctx = double(w.prompt_len) + double(w.output_len) / 2;
  // Ranks taking turns on shared cores: a step is at least every rank's busy time over the cores
  // (`turns`). A stage's ranks are busy through its arithmetic and its all-reduces (they poll
  // through those), for each micro-batch of each replica; waiting for another stage, they sleep.
  const double turns_per_stage_second =
      cores > 0 ? double(l.dp) * l.tp * e.micro_batches / cores : 0.0;
  // More TP groups' ranks with work at once than cores (each micro-batch at its own stage, each
  // replica its own): the scheduler's loss on their arithmetic and streaming, measured by `bench
  // comm --share-probe` (Calibration::core_sharing_efficiency); 1 where none was measured.
  const bool groups_contend =
      cores > 0 && l.tp > 1 && std::min(l.world(), l.dp * l.tp * e.micro_batches) > cores;
  const double sharing_stretch = groups_contend && cal && cal->core_sharing_efficiency > 0
                                     ? 1 / cal->core_sharing_efficiency
                                     : 1.0;
  double path = 0, slowest = 0, slowest_hop = 0, roofline = 0, flops_t = 0, mem_t = 0, max_sent = 0;
  double turns = 0;
  std::vector<CostTerm> terms;
  auto decode_step = [&] {
    path = slowest = slowest_hop = roofline = flops_t = mem_t = max_sent = turns = 0;
    terms.clear();
    for (int s = 0; s < l.pp; ++s) {
      const StageCost sc = stage_cost(c, l, w, k, r, cal, s, n, 1, ctx, false);
      path += sc.total();
      slowest = std::max(slowest, sc.total());
      turns += turns_per_stage_second * (sc.total() + (sharing_stretch - 1) * sc.roofline());
      roofline += sc.roofline();
      flops_t += sc.flops_time;
      mem_t += sc.mem_time;
      for (const CostTerm* t :
           {&sc.tp_ar, &sc.tp_embed, &sc.tp_logits, &sc.tp_skew, &sc.ep_a2a, &sc.ep_ar})
        add_term(terms, *t);
      double sent = sc.sent;
      if (s + 1 < l.pp) {
        // The link idles while the stage computes the next micro-batch (with one, the whole step).
        const double busy = pp_hop_cost(cl, l, k, s, n * h * ab, cal).seconds;
        const double idle =
            e.micro_batches > 1 ? std::max(0.0, sc.roofline() - busy) : sc.roofline();
        const CommCost p2p = pp_hop_cost(cl, l, k, s, n * h * ab, cal, idle);
        path += p2p.seconds;
        slowest_hop = std::max(slowest_hop, p2p.seconds);
        add_term(terms, {"pp p2p", 1, n * h * ab, p2p.seconds,
                         cat(k.pp[s]->name, k.split_hops ? ", 1/TP blocks all-gathered" : "")});
        sent += p2p.bytes_sent;
      } else if (l.pp > 1) {  // the sampled token ids back to the first stage
        const double bytes = n * 8;
        const CommCost p2p = collective_cost(Collective::P2P, bytes, 2, *k.pp_return, cal);
        path += p2p.seconds;
        add_term(terms, {"pp tokens to stage 0", 1, bytes, p2p.seconds, k.pp_return->name});
        sent += p2p.bytes_sent;
      }
      max_sent = std::max(max_sent, sent);
    }
    e.tpot = std::max({path, e.micro_batches * slowest, e.micro_batches * slowest_hop, turns});
  };
  decode_step();
  // Ranks on their own clocks: u is the part of the step a stage streams (m micro-batches of its
  // bytes), and the step's rate and u depend on each other; from u = 1 to the fixed point.
  for (int pass = 0; apart > 0 && cl.device.shared_memory_bw && pass < 50; ++pass) {
    const double u = std::min(1.0, e.micro_batches * mem_t / l.pp / e.tpot);
    const double bw = rank_mem_bw(cl, o, lockstep + apart * u);
    if (std::abs(bw - r.bw) <= 1e-6 * r.bw) break;
    r.bw = bw;
    decode_step();
  }
  e.decode_compute = roofline;
  e.decode_memory_bound = mem_t >= flops_t;
  terms.insert(terms.begin(),
               {r.additive              ? "weights + KV cache read, then matmuls (CPU: summed)"
                : e.decode_memory_bound ? "weights + KV cache (memory-bound)"
                                        : "matmuls (compute-bound)",
                l.pp, 0, roofline, cat(fmt::format("{:.1f}", r.bw / 1e9), " GB/s a rank")});
  e.decode_pipeline_wait = e.tpot - path;
  if (e.decode_pipeline_wait > 0)
    terms.push_back({turns >= e.tpot         ? cat("ranks taking turns on ", cores, " shared cores")
                     : slowest_hop > slowest ? "micro-batches queueing on a stage link"
                                             : "micro-batches queueing at stages",
                     0, 0, e.decode_pipeline_wait,
                     turns >= e.tpot && sharing_stretch > 1
                         ? fmt::format("TP groups at once get {:.0f}% of perfect sharing",
                                       100 / sharing_stretch)
                         : ""});
  e.decode_terms = terms;
  e.comm_bytes_per_token = max_sent / n;

  // Prefill of the replica's batch: the same micro-batches through a forward-only GPipe, at the
  // memory rate decode found (prefill's bytes are a small part of its time).
  const double P = double(w.prompt_len);
  double pre_slowest = 0, pre_p2p = 0, pre_turns = 0;
  for (int s = 0; s < l.pp; ++s) {
    const StageCost sc = stage_cost(c, l, w, k, r, cal, s, n, P, P, true);
    pre_slowest = std::max(pre_slowest, sc.total());
    pre_turns += turns_per_stage_second * sc.total();
    if (s + 1 < l.pp)
      pre_p2p = std::max(pre_p2p, pp_hop_cost(cl, l, k, s, n * P * h * ab, cal).seconds);
  }
  if (l.pp > 1) {
    const pipeline::Schedule sched = pipeline::gpipe(l.pp, e.micro_batches, true);
    e.ttft = pipeline::simulate(sched, {pre_slowest, 0, pre_p2p}).makespan +
             collective_cost(Collective::P2P, n * 8, 2, *k.pp_return, cal).seconds;
  } else {
    e.ttft = pre_slowest;
  }
  e.ttft = std::max(e.ttft, pre_turns);
  const double total_time = e.ttft + double(w.output_len - 1) * e.tpot;
  e.tokens_per_s = double(w.batch) * double(w.output_len) / total_time;
  e.tokens_per_s_per_device = e.tokens_per_s / l.world();

  // Reasons, the disqualifying ones first.
  const std::string placement = placement_problem(cl, l, o);
  e.allowed = placement.empty();
  if (!e.allowed) e.reasons.push_back(placement);
  if (l.dp > w.batch) {
    e.allowed = false;
    e.reasons.push_back(
        cat("DP=", l.dp, " > batch ", w.batch, ": ", l.dp - w.batch, " replica(s) would sit idle"));
  }
  if (!e.fits)
    e.reasons.push_back(cat("does not fit: ", gib(e.memory.total()), " per device (weights ",
                            gib(e.memory.weights), ", KV cache ", gib(e.memory.kv_cache),
                            ", activations ", gib(e.memory.activations), ") > ", gib(e.capacity),
                            " usable"));
  double tp_time = 0;
  for (const CostTerm& t : terms)
    if (t.name.rfind("tp ", 0) == 0) tp_time += t.seconds;
  if (l.tp > 1 && slow_for_tp(*k.tp))
    e.reasons.push_back(cat("TP over ", k.tp->name, ": ", 2 * c.num_hidden_layers + 1,
                            " all-reduces per token at ", us(k.tp->latency),
                            " latency per step cost ", ms_text(tp_time), " (",
                            fmt::format("{:.0f}", 100 * tp_time / e.tpot), "% of a token)"));
  else if (l.tp > 1 && tp_time > 0.15 * e.tpot)
    e.reasons.push_back(cat("TP all-reduces take ", fmt::format("{:.0f}", 100 * tp_time / e.tpot),
                            "% of a token (", ms_text(tp_time), ")"));
  if (l.tp > c.num_key_value_heads)
    e.reasons.push_back(cat("TP=", l.tp, " > ", c.num_key_value_heads,
                            " KV heads: each KV head stored on ", l.tp / c.num_key_value_heads,
                            " ranks"));
  if (l.pp > 1) {
    const double busy = e.micro_batches * (roofline / l.pp) / e.tpot;
    e.reasons.push_back(cat("PP=", l.pp, ": a token crosses ", l.pp, " stages in turn; batch ", b,
                            " in ", e.micro_batches, " micro-batch",
                            e.micro_batches > 1 ? "es" : "", " keeps each device busy ",
                            fmt::format("{:.0f}", 100 * std::min(1.0, busy)),
                            "% of the time (bubble)"));
  }
  if (l.ep > 1)
    for (const CostTerm& t : terms)
      if (t.name == "ep all-to-all")
        e.reasons.push_back(cat("EP all-to-all: ", t.count, " per token, ", ms_text(t.seconds)));
  if (l.experts_over_tp)
    for (const CostTerm& t : terms)
      if (t.name == "ep=tp all-reduce")
        e.reasons.push_back(cat("experts over TP (--enable-expert-parallel): ", t.count,
                                " MoE all-reduces per token, ", ms_text(t.seconds)));
  return e;
}

std::string training_problem(const ModelConfig& c, const Layout& l, const TrainingWorkload& w) {
  if (w.global_batch < 1 || w.micro_batch < 1 || w.seq_len < 1)
    fail("plan", "global batch, micro-batch and sequence length must be >= 1 (got ", w.global_batch,
         ", ", w.micro_batch, ", ", w.seq_len, ")");
  if (std::string p = layout_problem(c, l); !p.empty()) return p;
  if (l.experts_over_tp)
    return "--enable-expert-parallel (experts over TP) is an inference layout; training has none";
  if (w.global_batch % (int64_t(l.dp) * w.micro_batch) != 0)
    return cat("global batch ", w.global_batch, " is not a multiple of DP x micro-batch = ", l.dp,
               " x ", w.micro_batch);
  const int64_t m = w.global_batch / (int64_t(l.dp) * w.micro_batch);
  int v = 1;
  if (schedule_for(l, w, &v) == pipeline::ScheduleKind::Interleaved) {
    if (v < 1) fail("plan", "interleaved schedule: chunks must be >= 1 (got ", v, ")");
    if (m % l.pp != 0)
      return cat("interleaved schedule: ", m, " micro-batches is not a multiple of PP=", l.pp);
    if (c.num_hidden_layers % (int64_t(l.pp) * v) != 0)
      return cat("interleaved schedule: ", c.num_hidden_layers,
                 " layers do not split into PP x chunks = ", l.pp, " x ", v);
  }
  return "";
}

LayoutEstimate estimate_training(const ModelConfig& c, const ClusterSpec& cl, const Layout& l,
                                 const TrainingWorkload& w, const PlanOptions& o) {
  if (std::string p = training_problem(c, l, w); !p.empty()) fail("plan", p);
  if (l.world() != cl.world())
    fail("plan", l.str(), " uses ", l.world(), " devices but the cluster has ", cl.world());
  const int m = int(w.global_batch / (int64_t(l.dp) * w.micro_batch));
  int v = 1;
  const pipeline::ScheduleKind kind = schedule_for(l, w, &v);
  LayoutEstimate e;
  e.layout = l;
  e.training = true;
  e.micro_batches = m;
  const Calibration* cal = cal_of(o);
  const Links k = find_links(cl, l);
  e.tp_link = l.tp > 1 ? k.tp->name : "-";
  e.pp_link = l.pp > 1 ? k.pp[0]->name : "-";
  e.dp_link = l.dp > 1 ? k.dp->name : "-";
  const Rates r{rank_flops(cl, o), rank_mem_bw(cl, o, std::min(l.world(), cl.gpus_per_node))};
  const double h = double(c.hidden_size), T = double(w.micro_batch) * double(w.seq_len);
  const bool sp = w.sequence_parallel && l.tp > 1;
  // Bytes per activation value (and per value of a TP or PP message), per weight and gradient.
  const double ab = precision_bytes(w.precision), wb = ab;
  // The products' rates: parallm's kernels as measured here, or the rank's FLOP/s for all.
  const TrainingRates& kr = o.training_rates;
  const bool measured = kr.measured() && !(o.flops > 0);
  const double gemm_f = measured ? kr.gemm_forward : r.flops;
  const double gemm_b = measured ? kr.gemm_backward : r.flops;
  const double attn_f = measured ? kr.attention_forward : r.flops;
  const double attn_b = measured ? kr.attention_backward : r.flops;
  const double head_f = measured && kr.head_forward > 0 ? kr.head_forward : gemm_f;
  const double head_b = measured && kr.head_backward > 0 ? kr.head_backward : gemm_b;

  // Per micro-batch, per stage; the simulator runs the schedule with each stage's own times (the
  // first holds the embedding, the last the LM head and the loss). The slowest stage's are shown.
  double tf = 0, tb = 0, tw = 0, params_dev = 0, expert_params_dev = 0;
  pipeline::SimOptions sim_opt;
  std::vector<CostTerm> terms;
  for (int s = 0; s < l.pp; ++s) {
    const StageParams P = stage_params(c, l, s);
    const double L = double(P.layers);
    const double expert_dev = 3 * h * double(c.expert_ffn()) / l.tp;
    const double L_moe = double(stage_moe_layers(c, l.pp, s));
    const double mlp_tok = c.is_moe() ? P.mlp + L_moe * c.num_experts_per_tok * expert_dev : P.mlp;
    const double v_local = double(ceil_div(c.vocab_size, l.tp));
    const double head_mat = s == l.pp - 1 ? v_local * h : 0.0;
    // The products' seconds: the layers' at their rates, the LM head's at its own.
    const double layer_lin = 2 * T * (P.attention + mlp_tok), head_lin = 2 * T * head_mat;
    const double prod_f = layer_lin / gemm_f + head_lin / head_f;
    const double prod_b = 2 * layer_lin / gemm_b + 2 * head_lin / head_b;
    const double core_attn = 2 * T * double(w.seq_len) * double(c.q_dim()) / l.tp * L;  // causal
    // Elementwise passes, memory-bound: each reads and writes its tensors once. Per layer: the
    // two RMSNorms (2 h each; SP: this rank's rows), the two residual adds (3 h each), RoPE and the
    // copies out of the QKV output (2 (qd + 2 kvd)), SwiGLU (3 f); the head's stage: the
    // cross-entropy's passes over the logits (max, exp-sum, gradient: 3 V_local), the embedding's
    // lookup (h). The backward makes about twice the passes.
    const double h_rows = sp ? h / l.tp : h;
    const double qkv_local =
        double(c.q_dim()) / l.tp + 2.0 * double(kv_heads_per_rank(c, l.tp) * c.head_dim);
    const double f_local = double(ceil_div(c.intermediate_size, l.tp)) *
                           (c.is_moe() ? double(c.num_experts_per_tok) : 1.0);
    double elem = L * (10 * h_rows + 2 * qkv_local + 3 * f_local);
    if (s == l.pp - 1) elem += 3 * v_local;
    if (s == 0) elem += h_rows;
    const double elem_time = T * elem * ab / r.bw;
    const double fwd_c = std::max(prod_f + core_attn / attn_f + elem_time, wb * P.total() / r.bw);
    double bwd_c = prod_b + 2 * core_attn / attn_b + 2 * elem_time;
    if (w.recompute == Recompute::Full) bwd_c += fwd_c;
    // Selective: the softmax recomputed from q and k (QK^T, half the attention's forward).
    if (w.recompute == Recompute::Selective) bwd_c += 0.5 * core_attn / attn_f;
    // TP: two all-reduces per layer forward and two backward; with SP each becomes a
    // reduce-scatter + all-gather pair. Full recompute repeats the forward ones.
    double tp_f = 0;
    CostTerm tp_term{"tp collectives", 0, T * h * ab, 0, e.tp_link};
    if (l.tp > 1) {
      double one;
      if (sp)
        one = collective_cost(Collective::ReduceScatter, T * h * ab, l.tp, *k.tp, cal).seconds +
              collective_cost(Collective::AllGather, T * h * ab, l.tp, *k.tp, cal).seconds;
      else
        one = collective_cost(Collective::AllReduce, T * h * ab, l.tp, *k.tp, cal).seconds;
      tp_f = 2 * L * one;
      if (s == l.pp - 1)  // vocab-parallel cross-entropy: max, sum and target logit per token
        tp_f += 3 * collective_cost(Collective::AllReduce, T * 4, l.tp, *k.tp, cal).seconds;
      tp_term.count = int(2 * P.layers * (w.recompute == Recompute::Full ? 3 : 2));
    }
    const double tp_b = w.recompute == Recompute::Full ? 2 * tp_f : tp_f;
    double ep_f = 0;
    if (l.ep > 1)
      ep_f = 2 * L_moe *
             collective_cost(Collective::AllToAll, T * c.num_experts_per_tok * h * ab, l.ep, *k.ep,
                             cal)
                 .seconds;
    double zero3 =
        0;  // ZeRO-3 gathers the stage's weights for the forward and again for the backward
    if (w.zero >= 3 && l.dp > 1)
      zero3 = collective_cost(Collective::AllGather, wb * P.total(), l.dp, *k.dp, cal).seconds;
    const double stage_f = fwd_c + tp_f + ep_f + zero3, stage_b = bwd_c + tp_b + ep_f + zero3;
    // ZB-H1's W: the weight-gradient products, half the backward's (dW = dY^T X beside dX = dY W);
    // B is the rest of the backward.
    const double stage_w = prod_b / 2;
    sim_opt.stage_forward.push_back(stage_f);
    sim_opt.stage_backward.push_back(stage_b);
    sim_opt.stage_weight.push_back(stage_w);
    if (stage_f + stage_b > tf + tb) {
      tf = stage_f;
      tb = stage_b;
      tw = stage_w;
      tp_term.seconds = (tp_f + tp_b) * m;
      terms = {{"matmuls", 0, 0, (prod_f + prod_b) * m,
                measured ? "parallm's kernels, measured here" : ""},
               {"attention core", 0, 0,
                (core_attn / attn_f + 2 * core_attn / attn_b +
                 (w.recompute == Recompute::Selective ? 0.5 * core_attn / attn_f : 0)) *
                    m,
                ""},
               {"elementwise passes (memory-bound)", 0, 0, 3 * elem_time * m, ""}};
      if (w.recompute == Recompute::Full)
        terms.push_back({"full recompute (forward again)", 0, 0, fwd_c * m, ""});
      if (l.tp > 1) terms.push_back(tp_term);
      if (l.ep > 1)
        terms.push_back({"ep all-to-all", int(4 * L_moe), 0, 2 * ep_f * m, k.ep->name});
      if (zero3 > 0) terms.push_back({"zero-3 weight all-gathers", 2, 0, 2 * zero3 * m, e.dp_link});
    }
    params_dev = std::max(params_dev, P.total());
    expert_params_dev = std::max(expert_params_dev, P.experts);
  }
  double p2p = 0;
  for (int s = 0; s + 1 < l.pp; ++s)
    p2p = std::max(
        p2p,
        collective_cost(Collective::P2P, T * h * ab / (sp ? l.tp : 1), 2, *k.pp[s], cal).seconds);
  e.forward_time = tf;
  e.backward_time = tb;
  e.p2p_time = p2p;
  const pipeline::Schedule sched = pipeline::make_schedule(kind, l.pp, m, v, false);
  sim_opt.forward_time = tf;
  sim_opt.backward_time = tb;
  sim_opt.weight_time = tw;
  sim_opt.p2p_time = p2p;
  const pipeline::SimResult sim = pipeline::simulate(sched, sim_opt);
  e.bubble_fraction = sim.bubble_fraction;
  e.peak_in_flight = sim.peak_in_flight[0];
  if (l.pp > 1)
    terms.push_back({"pipeline bubble + p2p", 0, 0, sim.makespan - m * (tf + tb),
                     cat(schedule_kind_name(kind), ", ", e.pp_link)});

  // Gradients: dense over DP, experts over DP/EP; ZeRO-2/3 reduce-scatter then all-gather the
  // updated weights: the same volume as the all-reduce.
  const double dense_dev = params_dev - expert_params_dev;
  std::string dp_detail = e.dp_link;
  if (l.dp > 1) {
    const double bytes = wb * dense_dev;
    if (w.zero == 0 && w.overlap_grad_reduce && w.bucket_bytes > 0) {
      // The engine's buckets (train/dp.cpp): whole parameters from the last layer's back, each
      // at least bucket_bytes, reduced one after another on a communication thread as soon as
      // the last micro-batch's backward (tb, the slowest stage's) has produced them. Taken as
      // equal buckets ready at even intervals of the backward: bucket i is ready at tb (i+1)/B
      // and starts when it is ready and the one before it is done; the step waits for what is
      // left after the backward (at least the last bucket's reduction).
      // On CPU ranks the reduction is not free for the backward: the communication thread
      // (polling MPI) and the kernel's network stack run on the cores the compute threads use.
      // Measured (`bench comm --load`, the calibration's beside_compute): each bucket at the
      // collective's cost beside computing threads, the backward at what they kept of their
      // speed. Otherwise: one more runnable thread beside a rank's t, the backward at t / (t + 1)
      // while a bucket is reduced, the bucket at its own cost (the emulated cluster's DP=2
      // training, one thread a rank, traced: beside the backward the 2.2 MB buckets took 1.7x
      // their time alone at 1846-3848 Mbit/s and 6-8 ms for 1 ms at 46 Gbit/s, as the
      // calibration's loaded all-reduce does, its alpha 0.3-6 ms of time slices).
      double speed = 1;
      const Calibration* beside_cal = nullptr;
      Calibration beside;
      if (cl.device.is_cpu) {
        const int t = kr.threads > 0 ? kr.threads
                                     : std::max(1, cl.device.cores / std::max(1, cl.gpus_per_node));
        speed = double(t) / (t + 1);
        if (cal && cal->beside_compute.threads > 0 &&
            cal->beside_compute.ops.count("all_reduce") > 0) {
          beside = *cal;
          beside.ops = cal->beside_compute.ops;
          beside_cal = &beside;
          speed = cal->beside_compute.compute_speed;
        }
      }
      const int B = int(std::clamp(std::floor(bytes / w.bucket_bytes), 1.0, 1e6));
      const double one =
          collective_cost(Collective::AllReduce, bytes / B, l.dp, *k.dp, cal).seconds;
      const double one_beside =
          beside_cal
              ? collective_cost(Collective::AllReduce, bytes / B, l.dp, *k.dp, beside_cal).seconds
              : one;
      const double extra = overlapped_reduction(tb, one, one_beside, B, speed);
      e.dp_comm_time += B * one;
      e.dp_comm_exposed += extra;
      e.dp_buckets = B;
      dp_detail =
          cat(e.dp_link, ", ", B, B == 1 ? " bucket" : " buckets", ", ",
              fmt::format("{:.0f}", 1e3 * std::max(0.0, B * one - extra)),
              " ms under the last backward",
              beside_cal  ? fmt::format(" (each {:.1f} ms beside it, which keeps {:.2f} of its "
                                         "speed: calibrated)",
                                        1e3 * one_beside, speed)
              : speed < 1 ? fmt::format(" (which runs at {:.2f} of its speed meanwhile)", speed)
                          : std::string());
    } else {
      // ZeRO (reduce-scatter, then the all-gather after the optimizer) or --no-overlap: the
      // whole volume after the backward.
      const double whole = collective_cost(Collective::AllReduce, bytes, l.dp, *k.dp, cal).seconds;
      e.dp_comm_time += whole;
      e.dp_comm_exposed += whole;
      e.dp_buckets = 1;
    }
  }
  if (l.dp / l.ep > 1 && expert_params_dev > 0) {
    const double experts =
        collective_cost(Collective::AllReduce, wb * expert_params_dev, l.dp / l.ep, *k.dp, cal)
            .seconds;
    e.dp_comm_time += experts;
    e.dp_comm_exposed += experts;
  }
  if (e.dp_comm_time > 0)
    terms.push_back({"dp gradient all-reduce (exposed)", std::max(e.dp_buckets, 1),
                     wb * dense_dev / std::max(e.dp_buckets, 1), e.dp_comm_exposed, dp_detail});
  // Optimizer: reads weights, gradients and states, writes weights and states (memory-bound).
  // f32 (parallm): Adam reads p, g, m, v and writes p, m, v (28 bytes), the gradient clipping reads
  // g and zeroing writes it (8): 36; SGD with momentum 20 + 8. Mixed precision: 30 and 22.
  const bool f32 = w.precision == Precision::FP32;
  const double opt_bytes_per_param =
      w.optimizer == Optimizer::Adam ? (f32 ? 36 : 30) : (f32 ? 28 : 22);
  e.optimizer_time = params_dev / (w.zero >= 1 ? l.dp : 1) * opt_bytes_per_param / r.bw;
  terms.push_back({"optimizer step", 1, 0, e.optimizer_time, ""});
  e.step_time = sim.makespan + e.dp_comm_exposed + e.optimizer_time;
  e.step_terms = terms;
  e.tokens_per_s = double(w.global_batch) * double(w.seq_len) / e.step_time;
  e.tokens_per_s_per_device = e.tokens_per_s / l.world();
  e.mfu =
      training_flops_per_token(c, w.seq_len) * e.tokens_per_s / (l.world() * cl.device.peak_flops);

  e.stage_activations = stage_activations(c, l, w, sched);
  e.stage_in_flight = sim.peak_in_flight;
  e.stage_forward_time = sim_opt.stage_forward;
  e.stage_backward_time = sim_opt.stage_backward;
  e.stage_weight_time = sim_opt.stage_weight;
  for (int s = 0; s < l.pp; ++s) {
    MemoryBreakdown mem = training_memory(c, l, w, s, 0);
    mem.activations = e.stage_activations[s].peak_bytes + e.stage_activations[s].scratch;
    if (s == 0 || mem.total() > e.memory.total()) e.memory = mem;
  }
  e.capacity = cl.device.usable_memory();
  e.fits = e.memory.total() <= e.capacity;

  const std::string placement = placement_problem(cl, l, o);
  e.allowed = placement.empty();
  if (!e.allowed) e.reasons.push_back(placement);
  if (!e.fits)
    e.reasons.push_back(cat("does not fit: ", gib(e.memory.total()), " per device (weights ",
                            gib(e.memory.weights), ", gradients ", gib(e.memory.gradients),
                            ", optimizer ", gib(e.memory.optimizer), ", activations ",
                            gib(e.memory.activations), " for ",
                            fmt::format("{:g}", sim.peak_in_flight[e.memory.stage]),
                            " micro-batches in flight) > ", gib(e.capacity), " usable"));
  if (l.tp > 1 && slow_for_tp(*k.tp))
    e.reasons.push_back(
        cat("TP over ", k.tp->name, ": activations cross a slow link 4x per layer"));
  if (l.pp > 1)
    e.reasons.push_back(cat(
        "pipeline bubble ", fmt::format("{:.1f}", 100 * e.bubble_fraction), "% (",
        schedule_kind_name(kind), ", ", m, " micro-batches over ", l.pp, " stages; formula ",
        fmt::format("{:.1f}", 100 * pipeline::bubble_formula(kind, l.pp, m, v, {tf, tb, p2p, tw})),
        "%)"));
  if (e.dp_comm_exposed > 0.1 * e.step_time)
    e.reasons.push_back(cat("DP gradient all-reduce over ", e.dp_link, " adds ",
                            fmt::format("{:.0f}", 100 * e.dp_comm_exposed / e.step_time),
                            "% to the step (what the backward does not hide)"));
  return e;
}

}  // namespace parallm::plan
