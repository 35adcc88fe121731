// parallm plan: given a model and hardware, every layout's memory, communication, latency and
// throughput, ranked, with reasons. See docs/parallelism-guide.md.
#include "parallm/cli/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "parallm/cli/command.h"
#include "parallm/core/error.h"
#include "parallm/plan/cluster.h"
#include "parallm/plan/model_presets.h"
#include "parallm/plan/search.h"

namespace parallm::cli {
namespace {

using Options = PlanOptions;

// Bounds of the count flags: far beyond real clusters and workloads, small enough that products
// of them (devices, tokens x hidden) stay exact.
constexpr int64_t kMaxTokens = int64_t(1) << 24;  // per sequence, and sequences per batch

// A count flag: 0 when absent, else within [1, max]; one line naming the flag and value.
int64_t count_flag(const Options& o, int64_t v, const char* flag, int64_t max) {
  if (!o.given(flag)) return v;
  if (v < 1 || v > max) fail("plan", flag, " must be an integer in 1..", max, ", got ", v);
  return v;
}

// A rate flag (GB/s, GFLOP/s): 0 when absent, else positive and finite.
double rate_flag(const Options& o, double v, const char* flag) {
  if (!o.given(flag)) return v;
  if (!std::isfinite(v) || !(v > 0)) fail("plan", flag, " must be positive, got ", v);
  return v;
}

// A flag given with `value` that only --gpu cpu inference plans take: one line naming it, what
// it describes on a CPU (`cpu_what`), and why not on this device or for training.
template <typename V>
void cpu_inference_only(const Options& o, const plan::DeviceSpec& dev, const char* flag, V value,
                        const char* cpu_what, const char* device_not, const char* train_not) {
  if (!dev.is_cpu)
    fail("plan", flag, " ", value, " is for --gpu cpu (", cpu_what, "); device \"", dev.name, "\" ",
         device_not);
  if (o.train) fail("plan", flag, " ", value, " is for inference plans", train_not);
}

// A string flag given empty would pass for absent.
void nonempty_flag(const Options& o, const std::string& v, const char* flag) {
  if (o.given(flag) && v.empty()) fail("plan", flag, " must not be empty");
}

void list_presets() {
  std::printf("models:\n");
  for (const auto& p : plan::model_presets())
    std::printf("  %-16s %8.2f B params (published %.2f B)\n", p.name.c_str(),
                p.config.param_count() / 1e9, p.published_params / 1e9);
  std::printf("devices:\n");
  for (const auto& name : plan::device_preset_names()) {
    const plan::DeviceSpec d = plan::device_preset(name);
    if (d.is_cpu)
      std::printf(
          "  %-10s this machine: %d cores, %.1f GiB; memory bandwidth measured (or --mem-bw)\n",
          name.c_str(), d.cores, d.mem_capacity / (1 << 30));
    else
      std::printf("  %-10s %6.1f TFLOP/s bf16, %6.0f GB/s, %5.1f GiB, %s\n", name.c_str(),
                  d.peak_flops / 1e12, d.mem_bw / 1e9, d.mem_capacity / (1 << 30),
                  d.native_link.c_str());
  }
  std::printf("links:\n");
  for (const auto& name : plan::link_preset_names()) {
    const plan::LinkSpec l = plan::link_preset(name);
    std::printf("  %-10s %7.2f GB/s per direction, %4.1f us latency\n", name.c_str(),
                l.bandwidth / 1e9, l.latency * 1e6);
  }
}

}  // namespace

plan::PlanRequest make_plan_request(const PlanOptions& o) {
  if (o.model.empty())
    fail("plan", "--model is required (a preset, a config.json, or a directory; --list)");
  // Every flag first, so that a bad one is named before any file is read or bandwidth measured.
  const std::pair<const char*, const std::string*> strings[] = {
      {"--model", &o.model},
      {"--gpu", &o.cluster.gpu},
      {"--hardware", &o.cluster.hardware_file},
      {"--link", &o.cluster.link},
      {"--inter-node", &o.cluster.inter_node},
      {"--topology", &o.cluster.topology_file},
      {"--calibrate", &o.calibrate},
      {"--dtype", &o.dtype},
      {"--kv-dtype", &o.kv_dtype},
      {"--act-dtype", &o.act_dtype}};
  for (const auto& [flag, value] : strings) nonempty_flag(o, *value, flag);
  plan::ClusterOptions copt = o.cluster;
  copt.gpus = int(count_flag(o, o.gpus, "--gpus", plan::kMaxDevices));
  copt.nodes = int(count_flag(o, o.nodes, "--nodes", plan::kMaxDevices));
  copt.gpus_per_node =
      int(count_flag(o, o.gpus_per_node, "--gpus-per-node", plan::kMaxDevicesPerNode));
  const int tp = int(count_flag(o, o.tp, "--tp", plan::kMaxDevices));
  const int pp = int(count_flag(o, o.pp, "--pp", plan::kMaxDevices));
  const int dp = int(count_flag(o, o.dp, "--dp", plan::kMaxDevices));
  const int ep = int(count_flag(o, o.ep, "--ep", plan::kMaxDevices));
  rate_flag(o, o.mem_bw_gbps, "--mem-bw");
  rate_flag(o, o.rank_mem_bw_gbps, "--rank-mem-bw");
  rate_flag(o, o.gflops, "--flops");
  rate_flag(o, o.reread_gbps, "--reread-bw");
  count_flag(o, o.top, "--top", 1 << 20);
  count_flag(o, o.batch, "--batch", kMaxTokens);
  count_flag(o, o.prompt_len, "--prompt-len", kMaxTokens);
  count_flag(o, o.output_len, "--output-len", kMaxTokens);
  count_flag(o, o.global_batch, "--global-batch", kMaxTokens);
  count_flag(o, o.micro_batch, "--micro-batch", kMaxTokens);
  count_flag(o, o.seq_len, "--seq-len", kMaxTokens);
  count_flag(o, o.chunks, "--chunks", 1024);
  count_flag(o, o.threads, "--threads", 1 << 16);
  count_flag(o, o.shared_cores, "--shared-cores", 1 << 16);
  if (o.sp && o.no_sp) fail("plan", "--sp and --no-sp contradict each other: give one");
  plan::PlanRequest req;
  req.model = plan::resolve_model(o.model, &req.model_name);
  req.cluster = plan::build_cluster(copt);
  plan::DeviceSpec& dev = req.cluster.device;
  if (dev.is_cpu && dev.mem_bw == 0 && o.mem_bw_gbps == 0) {
    // Measure this node once (ranks share it), and one rank alone with its share of the cores.
    dev.mem_bw = plan::measure_memory_bandwidth(dev.cores);
    if (o.rank_mem_bw_gbps == 0)
      dev.rank_mem_bw = plan::measure_memory_bandwidth(
          std::max(1, dev.cores / std::max(1, req.cluster.gpus_per_node)));
  }
  req.goal = plan::parse_goal(o.goal);
  if (!o.calibrate.empty()) req.options.calibration = plan::Calibration::from_file(o.calibrate);
  if (o.mem_bw_gbps < 0) fail("plan", "--mem-bw must be positive, got ", o.mem_bw_gbps);
  if (o.rank_mem_bw_gbps < 0)
    fail("plan", "--rank-mem-bw must be positive, got ", o.rank_mem_bw_gbps);
  if (o.rank_mem_bw_gbps > 0 && !dev.is_cpu)
    fail("plan", "--rank-mem-bw is for --gpu cpu (ranks sharing a node's memory); device \"",
         dev.name, "\" has its own");
  if (o.gflops < 0) fail("plan", "--flops must be positive, got ", o.gflops);
  if (o.reread_gbps > 0)
    cpu_inference_only(o, dev, "--reread-bw", o.reread_gbps, "parallm's CPU decode GEMV",
                       "keeps the roofline", " (the decode GEMV); training runs GEMMs");
  req.options.mem_bw = o.mem_bw_gbps * 1e9;
  req.options.rank_mem_bw = o.rank_mem_bw_gbps * 1e9;
  req.options.flops = o.gflops * 1e9;
  req.options.reread_bw = o.reread_gbps * 1e9;
  req.options.tp_anywhere = o.tp_anywhere;
  if (o.shared_cores > 0)
    cpu_inference_only(o, dev, "--shared-cores", o.shared_cores,
                       "ranks sharing one machine's cores", "is one rank each",
                       "; training plans give each rank its own cores (--threads)");
  req.options.shared_cores = int(o.shared_cores);
  req.pinned = {tp, pp, dp, ep};
  req.only_experts_over_tp = o.enable_expert_parallel;
  if (o.top < 1) fail("plan", "--top must be >= 1, got ", o.top);
  req.training = o.train;
  if (o.train) {
    plan::TrainingWorkload& w = req.train;
    w.global_batch = o.global_batch;
    w.micro_batch = o.micro_batch;
    w.seq_len = o.seq_len;
    w.optimizer = plan::parse_optimizer(o.optimizer, "--optimizer");
    w.recompute = plan::parse_recompute(o.recompute, "--recompute");
    w.sequence_parallel = !o.no_sp;
    // f32 is what parallm's engine trains in (the --gpu cpu default); GPUs: bf16 mixed precision.
    w.precision = !o.given("--dtype") ? (dev.is_cpu ? plan::Precision::FP32 : plan::Precision::BF16)
                                      : plan::parse_precision(o.dtype, "--dtype");
    if (w.precision != plan::Precision::FP32 && w.precision != plan::Precision::BF16 &&
        w.precision != plan::Precision::FP16)
      fail("plan", "--dtype ", o.dtype, ": training runs in fp32 (parallm's engine), bf16 or fp16");
    if (o.zero < 0 || o.zero > 3) fail("plan", "--zero must be 0, 1, 2 or 3, got ", o.zero);
    w.zero = o.zero;
    w.schedule = pipeline::parse_schedule_kind(o.schedule);
    if (o.chunks < 1) fail("plan", "--chunks must be >= 1, got ", o.chunks);
    w.chunks = o.chunks;
    if (!(o.bucket_mb > 0)) fail("plan", "--bucket-mb must be positive, got ", o.bucket_mb);
    w.bucket_bytes = o.bucket_mb * 1e6;
    w.overlap_grad_reduce = !o.no_overlap;
    // CPU ranks: the training kernels' rates, measured here at this model's shapes with each
    // rank's threads (--flops, or "gflops" in the calibration, replaces them).
    const bool flops_given =
        o.gflops > 0 || (req.options.calibration && req.options.calibration->flops > 0);
    if (dev.is_cpu && !flops_given) {
      const int threads = o.threads > 0
                              ? int(o.threads)
                              : std::max(1, dev.cores / std::max(1, req.cluster.gpus_per_node));
      // Every rank of the node at once: they share its cores and memory while they train.
      req.options.training_rates = plan::measure_training_rates(req.model, w.micro_batch, w.seq_len,
                                                                threads, req.cluster.gpus_per_node);
      req.options.training_rates.threads = threads;
    }
  } else {
    plan::InferenceWorkload& w = req.inference;
    if (o.batch < 1) fail("plan", "--batch must be >= 1, got ", o.batch);
    if (o.prompt_len < 1) fail("plan", "--prompt-len must be >= 1, got ", o.prompt_len);
    if (o.output_len < 1) fail("plan", "--output-len must be >= 1, got ", o.output_len);
    w.batch = o.batch;
    w.prompt_len = o.prompt_len;
    w.output_len = o.output_len;
    w.weights = plan::parse_precision(o.dtype, "--dtype");
    // Quantised weights usually keep a 16-bit KV cache.
    const bool quantised = w.weights == plan::Precision::INT8 || w.weights == plan::Precision::INT4;
    w.kv_cache = o.kv_dtype.empty() ? (quantised ? plan::Precision::FP16 : w.weights)
                                    : plan::parse_precision(o.kv_dtype, "--kv-dtype");
    // parallm's CPU engine keeps activations in f32; GPU engines in 16 bits.
    w.activations = !o.act_dtype.empty()        ? plan::parse_precision(o.act_dtype, "--act-dtype")
                    : req.cluster.device.is_cpu ? plan::Precision::FP32
                                                : plan::Precision::FP16;
  }
  return req;
}

nlohmann::json plan_json(const PlanOptions& o) {
  const plan::PlanRequest req = make_plan_request(o);
  return plan::to_json(req, plan::search(req));
}

namespace {

int run(const Options& o) {
  if (o.list) {
    list_presets();
    return 0;
  }
  const plan::PlanRequest req = make_plan_request(o);
  const plan::PlanResult res = plan::search(req);
  if (o.json)
    std::cout << plan::to_json(req, res).dump(2) << "\n";
  else
    std::cout << plan::render_report(req, res, o.top);
  return 0;
}

const bool registered = register_command(
    {"plan", "Predict memory, communication, latency and throughput of every layout; recommend one",
     [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       app.add_option("--model", o->model,
                      "Preset (see --list), a config.json, or a directory holding one");
       app.add_flag("--list", o->list, "List the model, device and link presets");
       app.add_option("--gpu", o->cluster.gpu,
                      "Device preset (a100-80g, h100-sxm, cpu, ...) or a device JSON file");
       app.add_option("--hardware", o->cluster.hardware_file,
                      "Cluster JSON: {gpu, nodes, gpus_per_node, intra_node, inter_node}");
       app.add_option("--gpus", o->gpus, "Devices in all (ranks, for --gpu cpu)");
       app.add_option("--nodes", o->nodes, "Nodes (default 1)");
       app.add_option("--gpus-per-node", o->gpus_per_node, "Devices per node");
       app.add_option("--link", o->cluster.link,
                      "Intra-node link: nvlink, nvlink3, nvlink4, pcie4, pcie5, shm");
       app.add_option("--inter-node", o->cluster.inter_node,
                      "Inter-node link: ib-hdr, ib-ndr, eth-10g, eth-25g, eth-100g");
       app.add_option("--topology", o->cluster.topology_file,
                      "Output of `nvidia-smi topo -m` (NVLink islands bound TP)");
       app.add_flag("--tp-anywhere", o->tp_anywhere, "Let TP leave an NVLink island or a node");
       app.add_option("--batch", o->batch, "Inference: sequences decoded together (default 1)");
       app.add_option("--prompt-len", o->prompt_len, "Inference: prompt tokens (default 512)");
       app.add_option("--output-len", o->output_len, "Inference: generated tokens (default 128)");
       app.add_option("--dtype", o->dtype,
                      "Weights: fp32, fp16, bf16, fp8, int8, int4 (default fp16); training: fp32 "
                      "(parallm's engine, the --gpu cpu default), bf16 (default) or fp16");
       app.add_option("--kv-dtype", o->kv_dtype,
                      "KV cache (default: as weights; fp16 for int8/int4)");
       app.add_option("--act-dtype", o->act_dtype,
                      "Activations and TP/PP messages (default fp16; fp32 on cpu)");
       app.add_option("--goal", o->goal, "latency (time per token) or throughput (tokens/s)");
       app.add_option("--top", o->top, "Layouts in the table (default 5)");
       app.add_flag("--json", o->json, "Machine-readable output");
       app.add_option("--calibrate", o->calibrate,
                      "Alpha/beta JSON from `parallm bench comm` (and optional compute rates)");
       app.add_option("--mem-bw", o->mem_bw_gbps,
                      "Measured memory bandwidth per device, GB/s (--gpu cpu: the node's, shared "
                      "by the ranks that stream at once)");
       app.add_option("--rank-mem-bw", o->rank_mem_bw_gbps,
                      "--gpu cpu: what one rank streams alone with its cores, GB/s (caps its share "
                      "when fewer ranks stream, e.g. one pipeline stage at batch 1)");
       app.add_option("--flops", o->gflops, "Measured compute per rank, GFLOP/s");
       app.add_option("--reread-bw", o->reread_gbps,
                      "--gpu cpu decode: GB/s a rank passes over its weights again from its "
                      "caches (the GEMV takes a step's tokens 4 at a time: the weights from "
                      "memory for the first 4, from the caches for each further 4; default: free)");
       app.add_option("--tp", o->tp, "Only layouts with this TP");
       app.add_option("--pp", o->pp, "Only layouts with this PP");
       app.add_option("--dp", o->dp, "Only layouts with this DP");
       app.add_option("--ep", o->ep, "Only layouts with this EP");
       app.add_flag("--enable-expert-parallel", o->enable_expert_parallel,
                    "Only vLLM's expert-parallel layouts: whole experts over the TP ranks "
                    "(mixture-of-experts inference; ranked beside the others without it)");
       app.add_flag("--train", o->train, "Plan training instead of inference");
       app.add_option("--global-batch,--global-batch-size", o->global_batch,
                      "Training: sequences per step (default 512)");
       app.add_option("--micro-batch,--micro-batch-size", o->micro_batch,
                      "Training: sequences per micro-batch (default 1)");
       app.add_option("--seq-len", o->seq_len, "Training: sequence length (default 4096)");
       app.add_option("--optimizer", o->optimizer, "Training: adam or sgd");
       app.add_option("--recompute", o->recompute, "Training: none, selective (default), full");
       app.add_flag("--no-sp", o->no_sp, "Training: no sequence parallelism");
       app.add_flag("--sp", o->sp, "Training: sequence parallelism with TP (the default)");
       app.add_option("--threads", o->threads,
                      "Training on --gpu cpu: threads per rank the kernels are measured with "
                      "(default cores / ranks per node)");
       app.add_option("--shared-cores", o->shared_cores,
                      "--gpu cpu inference: the cores all ranks of the job share (an emulated "
                      "cluster on one machine, mpirun --oversubscribe); with more ranks than "
                      "cores they take turns (default: every rank has its own)");
       app.add_option("--zero", o->zero,
                      "Training: ZeRO stage 0-3 (shard optimizer/gradients/weights over DP)");
       app.add_option("--schedule", o->schedule,
                      "Training: gpipe, 1f1b (default), interleaved, zb-h1");
       app.add_option("--chunks,--virtual-stages", o->chunks,
                      "Training: model chunks per stage for interleaved");
       app.add_option("--bucket-mb", o->bucket_mb,
                      "Training: DP gradient bucket size in MB (default 25, as train's)");
       app.add_flag("--no-overlap", o->no_overlap,
                    "Training: DP gradients reduced after the backward, not during it");
       // The subcommand outlives the run: ask it which flags were given.
       o->given = [&app](const char* flag) { return app.count(flag) > 0; };
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
