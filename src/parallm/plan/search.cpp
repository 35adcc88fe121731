#include "parallm/plan/search.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "parallm/core/checked.h"
#include "parallm/core/error.h"
#include "parallm/plan/cluster.h"
#include "parallm/plan/model_presets.h"

namespace parallm::plan {
namespace {

using nlohmann::json;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string bytes_h(double b) {
  if (b >= 1e9) return fmt::format("{:.2f} GB", b / 1e9);
  if (b >= 1e6) return fmt::format("{:.2f} MB", b / 1e6);
  if (b >= 1e3) return fmt::format("{:.1f} kB", b / 1e3);
  return fmt::format("{:.0f} B", b);
}

// Ascending divisors of n >= 1, by trial up to sqrt(n) in 64 bits (i * i cannot overflow).
std::vector<int> divisors(int n) {
  std::vector<int> low, high;
  for (int64_t i = 1; i * i <= n; ++i) {
    if (n % i != 0) continue;
    low.push_back(int(i));
    if (i * i != n) high.push_back(int(n / i));
  }
  low.insert(low.end(), high.rbegin(), high.rend());
  return low;
}

// The table's ep column: the degree, or "tp" for experts over the TP ranks.
std::string ep_column(const Layout& l) {
  return l.experts_over_tp ? std::string("tp") : std::to_string(l.ep);
}

// Higher is better.
double score(const PlanRequest& req, const LayoutEstimate& e) {
  if (e.training) return e.tokens_per_s;
  return req.goal == Goal::Latency ? -e.tpot - 1e-3 * e.ttft : e.tokens_per_s;
}

// The term names of two layouts' breakdowns, compared: which one explains the gap.
std::string biggest_gap(const std::vector<CostTerm>& mine, const std::vector<CostTerm>& best) {
  auto key = [](const std::string& n) {
    return n.rfind("weights", 0) == 0 || n.rfind("matmuls", 0) == 0 ? std::string("compute/memory")
                                                                    : n;
  };
  std::map<std::string, double> diff;
  for (const CostTerm& t : mine) diff[key(t.name)] += t.seconds;
  for (const CostTerm& t : best) diff[key(t.name)] -= t.seconds;
  std::string name;
  double gap = 0;
  for (const auto& [n, d] : diff)
    if (d > gap) gap = d, name = n;
  if (name.empty()) return "";
  return cat("; most of the gap: ", name, " (+", ms_text(gap), ")");
}

void add_comparisons(const PlanRequest& req, PlanResult& res) {
  if (res.ranked.empty() || !res.ranked[0].feasible()) return;
  const LayoutEstimate& best = res.ranked[0];
  for (size_t i = 1; i < res.ranked.size(); ++i) {
    LayoutEstimate& e = res.ranked[i];
    if (!e.feasible()) continue;
    std::string why;
    if (e.training) {
      why = fmt::format("step {:.2f} s vs {:.2f} s for {}{}", e.step_time, best.step_time,
                        best.layout.str(), biggest_gap(e.step_terms, best.step_terms));
    } else if (req.goal == Goal::Latency) {
      why = fmt::format("TPOT {} vs {} ({:.2f}x) for {}{}", ms_text(e.tpot), ms_text(best.tpot),
                        e.tpot / best.tpot, best.layout.str(),
                        biggest_gap(e.decode_terms, best.decode_terms));
    } else {
      why = fmt::format("{:.0f} tokens/s vs {:.0f} for {}{}", e.tokens_per_s, best.tokens_per_s,
                        best.layout.str(), biggest_gap(e.decode_terms, best.decode_terms));
    }
    e.reasons.insert(e.reasons.begin(), why);
  }
}

json terms_json(const std::vector<CostTerm>& terms) {
  json a = json::array();
  for (const CostTerm& t : terms)
    a.push_back({{"name", t.name},
                 {"count", t.count},
                 {"bytes", t.bytes},
                 {"ms", t.seconds * 1e3},
                 {"detail", t.detail}});
  return a;
}

json link_json(const LinkSpec& l) {
  return {{"name", l.name}, {"bandwidth_gbps", l.bandwidth / 1e9}, {"latency_us", l.latency * 1e6}};
}

}  // namespace

Goal parse_goal(std::string_view s, std::string_view flag) {
  if (s == "latency") return Goal::Latency;
  if (s == "throughput") return Goal::Throughput;
  fail("plan", flag, ": unknown goal \"", s, "\" (choose latency or throughput)");
}

PlanResult search(const PlanRequest& req) {
  const int64_t world64 = int64_t(req.cluster.nodes) * req.cluster.gpus_per_node;
  if (req.cluster.nodes < 1 || req.cluster.gpus_per_node < 1 || world64 > kMaxDevices)
    fail("plan", "the cluster has ", req.cluster.nodes, " nodes of ", req.cluster.gpus_per_node,
         " devices: expected 1..", kMaxDevices, " devices in all");
  const int world = int(world64);
  // The largest activation the estimates size (tokens of a step x the widest row, in f32 with the
  // engine's few buffers) must be a count that fits: the workload flags are bounded, the model's
  // shapes checked (ModelConfig::validate), but their product is checked here, once.
  {
    const ModelConfig& c = req.model;
    const int64_t widest = std::max({c.hidden_size, c.q_dim() + 2 * c.kv_dim(),
                                     2 * c.intermediate_size, c.vocab_size});
    const int64_t tokens =
        req.training ? checked_mul(req.train.seq_len, req.train.micro_batch,
                                   "plan: --seq-len x --micro-batch")
                     : checked_mul(req.inference.batch,
                                   checked_add(req.inference.prompt_len, req.inference.output_len,
                                               "plan: --prompt-len + --output-len"),
                                   "plan: --batch x (--prompt-len + --output-len)");
    checked_mul(checked_mul(tokens, widest, "plan: tokens of a step x the model's widest row"),
                int64_t(64), "plan: activation bytes of a step");
  }
  const Layout& pin = req.pinned;
  if (req.only_experts_over_tp && !req.model.is_moe())
    fail("plan", "--enable-expert-parallel needs a mixture-of-experts model (",
         req.model_name.empty() ? std::string("this one") : req.model_name, " is dense)");
  if (req.only_experts_over_tp && req.training)
    fail("plan", "--enable-expert-parallel is an inference layout: not with --train");
  PlanResult res;
  for (int tp : divisors(world)) {
    for (int pp : divisors(world / tp)) {
      const int dp = world / (tp * pp);
      for (int ep : divisors(dp)) {
        if (!req.model.is_moe() && ep > 1) continue;
        if (req.model.is_moe() && ep > req.model.num_local_experts) continue;
        if ((pin.tp && pin.tp != tp) || (pin.pp && pin.pp != pp) || (pin.dp && pin.dp != dp) ||
            (pin.ep && pin.ep != ep))
          continue;
        // Inference on a MoE model also tries vLLM's --enable-expert-parallel beside plain TP:
        // the same ranks, whole experts over the TP group (TP <= experts, as the engine asks).
        std::vector<Layout> tries{{tp, pp, dp, ep}};
        if (!req.training && req.model.is_moe() && ep == 1 && tp > 1 &&
            tp <= req.model.num_local_experts)
          tries.push_back({tp, pp, dp, ep, true});
        for (const Layout& l : tries) {
          if (req.only_experts_over_tp && !l.experts_over_tp) continue;
          // A layout that cannot run the model is reported with its reason; any other error (a
          // bad workload, a bug) propagates instead of passing for a rejected layout.
          const std::string why = req.training ? training_problem(req.model, l, req.train)
                                               : layout_problem(req.model, l);
          if (!why.empty()) {
            res.rejected.push_back({l, why});
            continue;
          }
          res.ranked.push_back(
              req.training
                  ? estimate_training(req.model, req.cluster, l, req.train, req.options)
                  : estimate_inference(req.model, req.cluster, l, req.inference, req.options));
        }
      }
    }
  }
  if (res.ranked.empty()) {
    if (pin.tp || pin.pp || pin.dp || pin.ep) {
      const Layout want{pin.tp ? pin.tp : 1, pin.pp ? pin.pp : 1, pin.dp ? pin.dp : 1,
                        pin.ep ? pin.ep : 1};
      if (want.tp * want.pp * want.dp > world || world % (want.tp * want.pp) != 0)
        fail("plan", "--tp ", want.tp, " --pp ", want.pp, (pin.dp ? cat(" --dp ", pin.dp) : ""),
             " does not match the cluster's ", world, " devices");
      if (!res.rejected.empty())
        fail("plan", res.rejected.front().layout.str(), ": ", res.rejected.front().why);
      fail("plan", "no layout of ", world, " devices matches --tp/--pp/--dp/--ep");
    }
    fail("plan", "no layout can run ", req.model_name, " on ", world, " devices: ",
         res.rejected.empty() ? std::string("none enumerated") : res.rejected.front().why);
  }
  std::stable_sort(res.ranked.begin(), res.ranked.end(),
                   [&](const LayoutEstimate& a, const LayoutEstimate& b) {
                     if (a.feasible() != b.feasible()) return a.feasible();
                     if (a.fits != b.fits) return a.fits;
                     return score(req, a) > score(req, b);
                   });
  add_comparisons(req, res);
  return res;
}

json to_json(const PlanRequest& req, const PlanResult& res) {
  const ClusterSpec& cl = req.cluster;
  json j;
  j["model"] = req.model_name;
  j["params"] = req.model.param_count();
  j["active_params_per_token"] = active_params_per_token(req.model);
  j["hardware"] = {{"device", cl.device.name},
                   {"devices", cl.world()},
                   {"nodes", cl.nodes},
                   {"gpus_per_node", cl.gpus_per_node},
                   {"peak_tflops", cl.device.peak_flops / 1e12},
                   {"mem_bw_gbps", cl.device.mem_bw / 1e9},
                   {"memory_gib", cl.device.mem_capacity / kGiB},
                   {"usable_memory_gib", cl.device.usable_memory() / kGiB},
                   {"intra_node", link_json(cl.has_nvlink ? cl.nvlink : cl.pcie)},
                   {"inter_node", link_json(cl.inter)},
                   {"largest_nvlink_island", cl.largest_island()},
                   {"rank_flops", rank_flops(cl, req.options)},
                   {"rank_mem_bw", rank_mem_bw(cl, req.options, cl.gpus_per_node)},
                   {"rank_mem_bw_alone", rank_mem_bw(cl, req.options, 1)},
                   {"shared_cores", req.options.shared_cores},
                   {"reread_gbps", req.options.reread_bw / 1e9}};
  if (req.options.calibration) {
    j["hardware"]["calibration"] = {{"source", req.options.calibration->source},
                                    {"backend", req.options.calibration->backend},
                                    {"world", req.options.calibration->world}};
  }
  if (req.training) {
    const TrainingWorkload& w = req.train;
    j["workload"] = {{"mode", "training"},
                     {"global_batch", w.global_batch},
                     {"micro_batch", w.micro_batch},
                     {"seq_len", w.seq_len},
                     {"recompute", recompute_name(w.recompute)},
                     {"sequence_parallel", w.sequence_parallel},
                     {"zero", w.zero},
                     {"schedule", pipeline::schedule_kind_name(w.schedule)},
                     {"chunks", w.chunks},
                     {"precision", precision_name(w.precision)}};
    const TrainingRates& kr = req.options.training_rates;
    if (kr.measured())
      j["hardware"]["training_kernels_gflops"] = {
          {"gemm_forward", kr.gemm_forward / 1e9},
          {"gemm_backward", kr.gemm_backward / 1e9},
          {"attention_forward", kr.attention_forward / 1e9},
          {"attention_backward", kr.attention_backward / 1e9},
          {"head_forward", kr.head_forward / 1e9},
          {"head_backward", kr.head_backward / 1e9}};
  } else {
    const InferenceWorkload& w = req.inference;
    j["workload"] = {{"mode", "inference"},
                     {"batch", w.batch},
                     {"prompt_len", w.prompt_len},
                     {"output_len", w.output_len},
                     {"weights", precision_name(w.weights)},
                     {"kv_cache", precision_name(w.kv_cache)},
                     {"activations", precision_name(w.activations)}};
  }
  j["goal"] = req.goal == Goal::Latency ? "latency" : "throughput";
  json layouts = json::array();
  for (const LayoutEstimate& e : res.ranked) {
    json o;
    o["tp"] = e.layout.tp;
    o["pp"] = e.layout.pp;
    o["dp"] = e.layout.dp;
    o["ep"] = e.layout.ep;
    o["experts_over_tp"] = e.layout.experts_over_tp;
    o["engine_flags"] = e.layout.engine_flags();
    o["fits"] = e.fits;
    o["allowed"] = e.allowed;
    o["feasible"] = e.feasible();
    o["weights_bytes_per_device"] = e.memory.weights;
    o["kv_cache_bytes_per_device"] = e.memory.kv_cache;
    o["activation_bytes_per_device"] = e.memory.activations;
    o["total_bytes_per_device"] = e.memory.total();
    o["usable_bytes_per_device"] = e.capacity;
    o["tp_link"] = e.tp_link;
    o["pp_link"] = e.pp_link;
    if (e.training) {
      o["gradient_bytes_per_device"] = e.memory.gradients;
      o["optimizer_bytes_per_device"] = e.memory.optimizer;
      o["micro_batches"] = e.micro_batches;
      o["peak_micro_batches_in_flight"] = e.peak_in_flight;
      o["forward_ms_per_micro_batch"] = e.forward_time * 1e3;
      o["backward_ms_per_micro_batch"] = e.backward_time * 1e3;
      o["p2p_ms"] = e.p2p_time * 1e3;
      o["bubble_fraction"] = e.bubble_fraction;
      o["dp_comm_ms"] = e.dp_comm_time * 1e3;
      o["dp_comm_exposed_ms"] = e.dp_comm_exposed * 1e3;
      o["dp_buckets"] = e.dp_buckets;
      o["step_time_s"] = e.step_time;
      o["tokens_per_s"] = e.tokens_per_s;
      o["tokens_per_s_per_device"] = e.tokens_per_s_per_device;
      o["mfu"] = e.mfu;
      o["dp_link"] = e.dp_link;
      o["breakdown"] = terms_json(e.step_terms);
      json stages = json::array();
      for (const StageActivations& a : e.stage_activations)
        stages.push_back({{"stage", a.stage},
                          {"micro_batches_in_flight", e.stage_in_flight[size_t(a.stage)]},
                          {"peak_states", a.peak_states},
                          {"activation_peak_bytes", a.peak_bytes},
                          {"activation_bytes_per_micro_batch", a.per_micro_batch},
                          {"activation_scratch_bytes", a.scratch},
                          {"forward_ms", 1e3 * e.stage_forward_time[size_t(a.stage)]},
                          {"backward_ms", 1e3 * e.stage_backward_time[size_t(a.stage)]},
                          {"weight_ms", 1e3 * e.stage_weight_time[size_t(a.stage)]}});
      o["stages"] = stages;
    } else {
      o["replica_batch"] = e.replica_batch;
      o["micro_batches"] = e.micro_batches;
      o["comm_bytes_per_token"] = e.comm_bytes_per_token;
      o["ttft_ms"] = e.ttft * 1e3;
      o["tpot_ms"] = e.tpot * 1e3;
      o["tokens_per_s"] = e.tokens_per_s;
      o["tokens_per_s_per_device"] = e.tokens_per_s_per_device;
      o["memory_bound"] = e.decode_memory_bound;
      o["breakdown"] = terms_json(e.decode_terms);
    }
    o["reasons"] = e.reasons;
    layouts.push_back(o);
  }
  j["layouts"] = layouts;
  json rejected = json::array();
  for (const Rejected& r : res.rejected)
    rejected.push_back({{"tp", r.layout.tp},
                        {"pp", r.layout.pp},
                        {"dp", r.layout.dp},
                        {"ep", r.layout.ep},
                        {"experts_over_tp", r.layout.experts_over_tp},
                        {"reason", r.why}});
  j["rejected"] = rejected;
  return j;
}

std::string render_report(const PlanRequest& req, const PlanResult& res, int top) {
  std::ostringstream out;
  const ClusterSpec& cl = req.cluster;
  out << "model    " << req.model_name << ": "
      << fmt::format("{:.2f}", req.model.param_count() / 1e9) << " B parameters";
  if (req.model.is_moe())
    out << " (" << fmt::format("{:.2f}", active_params_per_token(req.model) / 1e9)
        << " B active per token)";
  out << "\nhardware " << cl.describe() << "\n";
  out << "rates    per rank: " << fmt::format("{:.1f}", rank_flops(cl, req.options) / 1e12)
      << " TFLOP/s, "
      << fmt::format("{:.1f}",
                     rank_mem_bw(cl, req.options, std::min(cl.world(), cl.gpus_per_node)) / 1e9)
      << " GB/s"
      << (cl.device.shared_memory_bw
              ? cat(" with every rank streaming, ",
                    fmt::format("{:.1f}", rank_mem_bw(cl, req.options, 1) / 1e9),
                    " GB/s alone (shared node memory)")
              : "")
      << (req.options.calibration
              ? cat(" (comm calibrated from ", req.options.calibration->source, ")")
              : "")
      << (req.options.shared_cores > 0
              ? cat("; all ranks on ", req.options.shared_cores, " shared cores")
              : "")
      << (req.options.reread_bw > 0 && !req.training
              ? cat("; weights re-read from cache at ",
                    fmt::format("{:.1f}", req.options.reread_bw / 1e9),
                    " GB/s a further 4 tokens of a step")
              : "")
      << "\n";
  if (req.training) {
    const TrainingWorkload& w = req.train;
    out << "workload training: global batch " << w.global_batch << ", micro-batch " << w.micro_batch
        << ", seq " << w.seq_len << ", recompute " << recompute_name(w.recompute) << ", SP "
        << (w.sequence_parallel ? "on" : "off") << ", ZeRO " << w.zero << ", "
        << pipeline::schedule_kind_name(w.schedule)
        << (w.schedule == pipeline::ScheduleKind::Interleaved ? cat(" v=", w.chunks) : "") << ", "
        << precision_name(w.precision) << "\n";
    const TrainingRates& kr = req.options.training_rates;
    if (kr.measured() && !(req.options.flops > 0))
      out << fmt::format(
          "kernels  measured here per rank: GEMM {:.1f} GFLOP/s forward, {:.1f} backward; "
          "attention {:.1f}, {:.1f}; LM head {:.1f}, {:.1f}\n",
          kr.gemm_forward / 1e9, kr.gemm_backward / 1e9, kr.attention_forward / 1e9,
          kr.attention_backward / 1e9, kr.head_forward / 1e9, kr.head_backward / 1e9);
    out << "\n";
  } else {
    const InferenceWorkload& w = req.inference;
    out << "workload inference: batch " << w.batch << ", prompt " << w.prompt_len << ", output "
        << w.output_len << ", weights " << precision_name(w.weights) << ", KV "
        << precision_name(w.kv_cache) << "; goal "
        << (req.goal == Goal::Latency ? "latency" : "throughput") << "\n\n";
  }
  const int shown = std::min<int>(top, int(res.ranked.size()));
  if (req.training) {
    out << fmt::format(
        "{:>3} {:>4} {:>4} {:>4} {:>4} {:>5} {:>10} {:>9} {:>8} {:>10} {:>7} {:>6}\n", "#", "tp",
        "pp", "dp", "ep", "fits", "mem/dev", "step s", "bubble", "tokens/s", "MFU", "links");
    for (int i = 0; i < shown; ++i) {
      const LayoutEstimate& e = res.ranked[i];
      out << fmt::format(
          "{:3} {:4} {:4} {:4} {:4} {:>5} {:6.1f} GiB {:9.3f} {:7.1f}% {:10.0f} {:6.1f}% "
          "{}/{}/{}\n",
          i + 1, e.layout.tp, e.layout.pp, e.layout.dp, e.layout.ep,
          e.feasible() ? "yes" : (e.fits ? "rule" : "no"), e.memory.total() / kGiB, e.step_time,
          100 * e.bubble_fraction, e.tokens_per_s, 100 * e.mfu, e.tp_link, e.pp_link, e.dp_link);
    }
  } else {
    out << fmt::format(
        "{:>3} {:>4} {:>4} {:>4} {:>4} {:>5} {:>10} {:>10} {:>10} {:>9} {:>10} {:>11}  {}\n", "#",
        "tp", "pp", "dp", "ep", "fits", "mem/dev", "TTFT ms", "TPOT ms", "tokens/s", "tok/s/dev",
        "comm/token", "links tp/pp");
    for (int i = 0; i < shown; ++i) {
      const LayoutEstimate& e = res.ranked[i];
      out << fmt::format(
          "{:3} {:4} {:4} {:4} {:>4} {:>5} {:6.1f} GiB {:10.2f} {:10.3f} {:9.1f} {:10.1f} {:>11}  "
          "{}/{}\n",
          i + 1, e.layout.tp, e.layout.pp, e.layout.dp, ep_column(e.layout),
          e.feasible() ? "yes" : (e.fits ? "rule" : "no"), e.memory.total() / kGiB, e.ttft * 1e3,
          e.tpot * 1e3, e.tokens_per_s, e.tokens_per_s_per_device, bytes_h(e.comm_bytes_per_token),
          e.tp_link, e.pp_link);
    }
  }
  out << "(fits: yes; no = out of memory; rule = fits but breaks a placement rule)\n";
  for (int i = 0; i < shown; ++i)
    if (res.ranked[i].layout.experts_over_tp) {
      out << "(ep tp: --enable-expert-parallel, vLLM's layout: whole experts over the TP ranks, "
             "one all-reduce per MoE layer)\n";
      break;
    }
  const LayoutEstimate& best = res.ranked[0];
  if (best.feasible()) {
    out << "\nbest: " << best.layout.str() << "; memory per device "
        << fmt::format("{:.1f}", best.memory.total() / kGiB) << " GiB (weights "
        << fmt::format("{:.1f}", best.memory.weights / kGiB);
    if (best.training)
      out << ", gradients " << fmt::format("{:.1f}", best.memory.gradients / kGiB) << ", optimizer "
          << fmt::format("{:.1f}", best.memory.optimizer / kGiB);
    else
      out << ", KV cache " << fmt::format("{:.1f}", best.memory.kv_cache / kGiB);
    out << ", activations " << fmt::format("{:.1f}", best.memory.activations / kGiB) << ") of "
        << fmt::format("{:.1f}", best.capacity / kGiB) << " GiB usable\n";
    out << (best.training ? "  per step:\n" : "  per decode step (one token for each sequence):\n");
    for (const CostTerm& t : best.training ? best.step_terms : best.decode_terms) {
      out << "    " << t.name;
      if (t.count > 0 && t.bytes > 0) out << ": " << t.count << " x " << bytes_h(t.bytes);
      out << "  " << ms_text(t.seconds);
      if (!t.detail.empty()) out << "  [" << t.detail << "]";
      out << "\n";
    }
    if (best.training) {
      out << "  per stage: F and B (W: ZB-H1's share of B) per micro-batch; activations held (the "
             "fullest TP rank; docs/parallelism-guide.md's formula over the schedule's actions):\n";
      for (const StageActivations& a : best.stage_activations) {
        const size_t st = size_t(a.stage);
        out << fmt::format(
            "    stage {}: F {} B {} (W {}); peak {} ({:g} micro-batches in flight, {} states) = "
            "{} "
            "per micro-batch; + {} scratch\n",
            a.stage, ms_text(best.stage_forward_time[st]), ms_text(best.stage_backward_time[st]),
            ms_text(best.stage_weight_time[st]), bytes_h(a.peak_bytes), best.stage_in_flight[st],
            a.peak_states, bytes_h(a.per_micro_batch), bytes_h(a.scratch));
      }
    }
    for (const std::string& r : best.reasons) out << "  note: " << r << "\n";
    // The command that runs it: serve's replicas (--dp) or generate's --ep (serve has none, and
    // --ep takes no replicas beside it: such a layout has no command).
    const Layout& bl = best.layout;
    if (!best.training && (bl.ep == 1 || bl.dp == bl.ep)) {
      const std::string flags = bl.engine_flags();
      out << "  run: parallm " << (bl.ep > 1 ? "generate" : "serve") << " --model MODEL"
          << (flags.empty() ? "" : " ") << flags
          << (bl.ep > 1 || bl.dp > 1 ? "" : "  (parallm generate takes the same flags)") << "\n";
    }
  } else {
    out << "\nno layout fits and follows the placement rules; the closest: " << best.layout.str()
        << "\n";
  }
  if (res.ranked.size() > 1) {
    out << "\nwhy the others lost:\n";
    const size_t limit = std::min<size_t>(res.ranked.size(), size_t(std::max(top, 12)));
    for (size_t i = best.feasible() ? 1 : 0; i < limit; ++i) {
      const LayoutEstimate& e = res.ranked[i];
      out << "  " << e.layout.str() << ": "
          << (e.reasons.empty() ? std::string("slower") : e.reasons[0]);
      for (size_t k = 1; k < e.reasons.size() && k < 3; ++k) out << "; " << e.reasons[k];
      out << "\n";
    }
    if (limit < res.ranked.size())
      out << "  ... " << res.ranked.size() - limit << " more (--top or --json)\n";
  }
  if (!res.rejected.empty()) {
    out << "cannot run at all:\n";
    std::map<std::string, std::vector<std::string>> by_reason;
    for (const Rejected& r : res.rejected) by_reason[r.why].push_back(r.layout.str());
    for (const auto& [why, ls] : by_reason)
      out << "  " << why << " (" << ls.size() << " layout" << (ls.size() > 1 ? "s" : "") << ")\n";
  }
  return out.str();
}

}  // namespace parallm::plan
