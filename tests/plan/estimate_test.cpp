// Latency, throughput and the search. The seed scenario (LLaMA-2 70B, fp16, 4 x A100 80 GB,
// NVLink vs PCIe, TP=4 vs PP=4 at batch 1, 8, 32) is worked by hand here, term by term.
#include "parallm/plan/estimate.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "parallm/pipeline/simulator.h"
#include "parallm/plan/cluster.h"
#include "parallm/plan/model_presets.h"
#include "parallm/plan/search.h"

namespace parallm::plan {
namespace {

// `--gpu GPU --gpus N [--link LINK]`.
ClusterSpec cluster_of(const std::string& gpu, int gpus, const std::string& link = "") {
  ClusterOptions o;
  o.gpu = gpu;
  o.gpus = gpus;
  if (!link.empty()) o.link = link;
  return build_cluster(o);
}

ClusterSpec a100x4(const std::string& link) {
  return cluster_of("a100-80g", 4, link);
}
// This machine as `ranks` ranks.
ClusterSpec cpu_cluster(int ranks) {
  return cluster_of("cpu", ranks);
}

// Prompts of `prompt` tokens, `output` new tokens each.
InferenceWorkload workload(int64_t batch, int64_t prompt, int64_t output) {
  InferenceWorkload w;
  w.batch = batch;
  w.prompt_len = prompt;
  w.output_len = output;
  return w;
}

InferenceWorkload seed_workload(int64_t batch) {
  return workload(batch, 512, 128);  // fp16 weights, KV and activations
}

// Decode of `batch` one-token prompts, one new token, bf16 weights, f32 activations (the engine's).
InferenceWorkload cpu_decode(int64_t batch) {
  InferenceWorkload w = workload(batch, 1, 1);
  w.weights = Precision::BF16;
  w.activations = Precision::FP32;
  return w;
}

// Recursive doubling over 4 ranks: 2 steps of alpha + n / beta.
double rd4(double n, double alpha, double beta) {
  return 2 * (alpha + n / beta);
}

TEST(Estimate, SeedScenarioTp4DecodeByHand) {
  const ModelConfig c = resolve_model("llama-2-70b");
  const double bw = 2039e9 * 0.8;  // A100 80 GB HBM at the 80% weight streaming reaches
  const double tp4_params = 80 * 213925888.0 + 2 * 8000.0 * 8192 + 8192;  // see memory_test
  // Streamed per token: all weights but the embedding table (one row looked up), and the KV cache
  // of 576 positions (512 prompt + 128/2 generated on average) plus the new token's.
  const double bytes = (tp4_params - 8000.0 * 8192 + 8192) * 2 + 577 * 81920.0;
  const double memory = bytes / bw;
  for (const std::string link : {"nvlink", "pcie4"}) {
    SCOPED_TRACE(link);
    const double alpha = link == "nvlink" ? 2e-6 : 8e-6, beta = link == "nvlink" ? 300e9 : 25e9;
    // 2 all-reduces per layer + the vocab-parallel embedding's, each of one token's hidden state
    // (8192 x 2 bytes = 16 KiB); then one all-gather of (value, index) pairs for sampling.
    const double tp_comm = 161 * rd4(16384, alpha, beta) + (2 * alpha + 0.75 * 32 / beta);
    const LayoutEstimate e =
        estimate_inference(c, a100x4(link), {4, 1, 1, 1}, seed_workload(1), {});
    EXPECT_NEAR(e.tpot, memory + tp_comm, 1e-12 + 1e-9 * e.tpot);
    EXPECT_TRUE(e.decode_memory_bound);
    // What each device sends per token: recursive doubling sends the whole 16 KiB twice per
    // all-reduce (a ring would send 2 x 3/4 x 16 KiB = 24 KiB in 6 steps: 160 x 24 KiB = 3.9 MB).
    EXPECT_DOUBLE_EQ(e.comm_bytes_per_token, 161 * 2 * 16384.0 + 0.75 * 32);
    EXPECT_NEAR(e.memory.weights / 1e9, 34.49, 0.01);
    EXPECT_TRUE(e.fits);
  }
  // The guide's figure for a ring (docs/parallelism-guide.md, "rules of thumb"): 160 all-reduces
  // of 16 KiB, each sending 2 (p-1)/p of the buffer, 3.93 MB. The planner's ring sends that (a
  // link without latency makes the ring the cheaper algorithm), recursive doubling (what it picks
  // above) the whole buffer twice.
  const LinkSpec no_latency{"test", LinkKind::NVLink, 300e9, 0};
  const CommCost ring = collective_cost(Collective::AllReduce, 16384, 4, no_latency);
  EXPECT_EQ(ring.algorithm, "ring");
  EXPECT_DOUBLE_EQ(ring.bytes_sent, 2 * (4 - 1) / 4.0 * 16384);
  EXPECT_NEAR(160 * ring.bytes_sent / 1e6, 3.93, 0.005);
  const CommCost rd = collective_cost(Collective::AllReduce, 16384, 4, link_preset("nvlink4"));
  EXPECT_EQ(rd.algorithm, "recursive-doubling");
  EXPECT_DOUBLE_EQ(rd.bytes_sent, 2 * 16384.0);
}

TEST(Estimate, SeedScenarioPp4DecodeByHand) {
  const ModelConfig c = resolve_model("llama-2-70b");
  const double bw = 2039e9 * 0.8, layer = 855654400.0;
  const double kv = 577 * 81920.0;  // 20 layers x 8 KV heads: the same bytes per token as TP=4
  const double s0 = (20 * layer * 2 + 16384 + kv) / bw;                    // embedding: one row
  const double s12 = (20 * layer * 2 + kv) / bw;                           // middle stages
  const double s3 = ((20 * layer + 32000.0 * 8192 + 8192) * 2 + kv) / bw;  // + output projection
  const double p2p = 3 * (2e-6 + 16384 / 300e9) + (2e-6 + 8 / 300e9);      // 3 hops + token back
  const LayoutEstimate e =
      estimate_inference(c, a100x4("nvlink"), {1, 4, 1, 1}, seed_workload(1), {});
  EXPECT_EQ(e.micro_batches, 1);
  EXPECT_NEAR(e.tpot, s0 + 2 * s12 + s3 + p2p, 1e-9 * e.tpot);
  // At batch 1 one stage works at a time: PP=4 is ~4x slower per token than TP=4.
  const LayoutEstimate tp =
      estimate_inference(c, a100x4("nvlink"), {4, 1, 1, 1}, seed_workload(1), {});
  EXPECT_GT(e.tpot / tp.tpot, 3.5);
  EXPECT_LT(e.tpot / tp.tpot, 4.2);
  // Batch 32 in 4 micro-batches of 8: each stage serves all 4 in turn.
  const LayoutEstimate e32 =
      estimate_inference(c, a100x4("nvlink"), {1, 4, 1, 1}, seed_workload(32), {});
  EXPECT_EQ(e32.micro_batches, 4);
  EXPECT_GE(e32.tpot, e.tpot);
  EXPECT_GT(e32.tokens_per_s, 20 * e.tokens_per_s);
}

TEST(Estimate, SeedScenarioNvlinkVsPcie) {
  const ModelConfig c = resolve_model("llama-2-70b");
  for (int64_t batch : {1, 8, 32}) {
    SCOPED_TRACE(batch);
    const auto nv = estimate_inference(c, a100x4("nvlink"), {4, 1, 1, 1}, seed_workload(batch), {});
    const auto pc = estimate_inference(c, a100x4("pcie4"), {4, 1, 1, 1}, seed_workload(batch), {});
    const auto pp_pc =
        estimate_inference(c, a100x4("pcie4"), {1, 4, 1, 1}, seed_workload(batch), {});
    EXPECT_GT(pc.tpot, nv.tpot);
    // Even over PCIe, TP=4 beats PP=4 for decode latency on this memory-bound model...
    EXPECT_LT(pc.tpot, pp_pc.tpot);
    // ...and PP's p2p hardly depends on the link: 3 small messages per token.
    const auto pp_nv =
        estimate_inference(c, a100x4("nvlink"), {1, 4, 1, 1}, seed_workload(batch), {});
    EXPECT_LT((pp_pc.tpot - pp_nv.tpot) / pp_nv.tpot, 0.01);
  }
  // TP over PCIe at decode sizes is latency, not bandwidth: 8x the bytes costs far less than 8x.
  auto tp_time = [&](int64_t batch) {
    const auto e = estimate_inference(c, a100x4("pcie4"), {4, 1, 1, 1}, seed_workload(batch), {});
    double t = 0;
    for (const CostTerm& term : e.decode_terms)
      if (term.name.rfind("tp ", 0) == 0) t += term.seconds;
    return t;
  };
  EXPECT_LT(tp_time(8) / tp_time(1), 2.0);
  EXPECT_GT(tp_time(1), 2e-3);  // 161 all-reduces x ~17 us
}

TEST(Search, SeedScenarioRecommendsTp4ForLatency) {
  PlanRequest req;
  req.model = resolve_model("llama-2-70b");
  req.model_name = "llama-2-70b";
  req.cluster = a100x4("nvlink");
  req.inference = seed_workload(8);
  const PlanResult res = search(req);
  ASSERT_FALSE(res.ranked.empty());
  EXPECT_EQ(res.ranked[0].layout, (Layout{4, 1, 1, 1}));
  EXPECT_TRUE(res.ranked[0].feasible());
  // Layouts on one or two devices do not fit 138 GB of weights.
  for (const LayoutEstimate& e : res.ranked) {
    if (e.layout.tp * e.layout.pp == 1) {
      EXPECT_FALSE(e.fits);
      ASSERT_FALSE(e.reasons.empty());
      EXPECT_NE(e.reasons[0].find("does not fit"), std::string::npos) << e.reasons[0];
    }
    if (e.feasible() && !(e.layout == Layout{4, 1, 1, 1})) {
      ASSERT_FALSE(e.reasons.empty());
      EXPECT_NE(e.reasons[0].find("TPOT"), std::string::npos) << e.reasons[0];
    }
  }
  const nlohmann::json j = to_json(req, res);
  EXPECT_EQ(j["params"].get<int64_t>(), 68976648192);
  ASSERT_EQ(j["layouts"].size(), res.ranked.size());
  for (const char* key :
       {"tp", "pp", "dp", "ep", "fits", "weights_bytes_per_device", "kv_cache_bytes_per_device",
        "comm_bytes_per_token", "ttft_ms", "tpot_ms", "tokens_per_s", "reasons"})
    EXPECT_TRUE(j["layouts"][0].contains(key)) << key;
  const std::string report = render_report(req, res, 5);
  EXPECT_NE(report.find("why the others lost"), std::string::npos);
  EXPECT_NE(report.find("tp all-reduce"), std::string::npos);
}

TEST(Search, ThroughputGoalAndRejectedLayouts) {
  PlanRequest req;
  req.model = resolve_model("llama-3-8b");
  req.model_name = "llama-3-8b";
  req.cluster = a100x4("nvlink");
  req.inference = seed_workload(64);
  req.goal = Goal::Throughput;
  const PlanResult res = search(req);
  // An 8B model fits one device, yet for decode throughput TP=4 beats 4 replicas: decode is
  // memory-bound, and TP streams a quarter of the weights per step for all 64 sequences while
  // each replica streams all of them for 16.
  EXPECT_EQ(res.ranked[0].layout, (Layout{4, 1, 1, 1}));
  const Layout dp4{1, 1, 4, 1};
  for (const LayoutEstimate& e : res.ranked)
    if (e.layout == dp4) {
      EXPECT_GT(e.tpot, 2 * res.ranked[0].tpot);
    }
  for (size_t i = 1; i < res.ranked.size(); ++i)
    if (res.ranked[i].feasible()) {
      EXPECT_LE(res.ranked[i].tokens_per_s, res.ranked[0].tokens_per_s);
    }
  // 3 devices: TP=3 cannot split 32 heads.
  ClusterOptions o;
  o.gpu = "a100-80g";
  o.gpus = 3;
  req.cluster = build_cluster(o);
  const PlanResult r3 = search(req);
  bool saw = false;
  for (const Rejected& r : r3.rejected)
    if (r.layout.tp == 3)
      saw = r.why.find("does not divide the 32 attention heads") != std::string::npos;
  EXPECT_TRUE(saw);
}

// Training with experts split over nodes: the EP all-to-all is timed and labelled with the link
// that joins the EP group (here InfiniBand between the two nodes), not the TP group's NVLink.
TEST(Estimate, TrainingEpAllToAllNamesTheEpLink) {
  const ModelConfig c = resolve_model("mixtral-8x7b");
  ClusterOptions co;
  co.gpu = "h100-sxm";
  co.nodes = 2;
  co.gpus_per_node = 8;
  co.inter_node = "ib-hdr";
  const ClusterSpec cl = build_cluster(co);
  TrainingWorkload w;
  w.global_batch = 16;
  w.micro_batch = 1;
  w.seq_len = 1024;
  // TP=8 fills a node; DP=2 = EP=2: the expert group is rank 0 and rank 8, one per node.
  const LayoutEstimate e = estimate_training(c, cl, {8, 1, 2, 2}, w, {});
  EXPECT_EQ(e.tp_link, "nvlink4");
  bool saw = false;
  for (const CostTerm& t : e.step_terms) {
    if (t.name != "ep all-to-all") continue;
    saw = true;
    EXPECT_EQ(t.detail, "ib-hdr");
  }
  EXPECT_TRUE(saw);
  // Inference names it the same way.
  const LayoutEstimate inf = estimate_inference(c, cl, {8, 1, 2, 2}, seed_workload(8), {});
  saw = false;
  for (const CostTerm& t : inf.decode_terms) {
    if (t.name != "ep all-to-all") continue;
    saw = true;
    EXPECT_EQ(t.detail.rfind("ib-hdr, ", 0), 0u) << t.detail;
  }
  EXPECT_TRUE(saw);
}

// Rejections are the layout's problems (layout_problem, training_problem), word for word; a bad
// workload or any other error is not passed off as every layout being rejected.
TEST(Search, RejectsOnlyWhatTheLayoutCannotRun) {
  PlanRequest req;
  req.model = resolve_model("llama-3-8b");
  req.model_name = "llama-3-8b";
  ClusterOptions o;
  o.gpu = "a100-80g";
  o.gpus = 6;
  req.cluster = build_cluster(o);
  req.inference = seed_workload(8);
  const PlanResult res = search(req);
  ASSERT_FALSE(res.rejected.empty());
  for (const Rejected& r : res.rejected) EXPECT_EQ(r.why, layout_problem(req.model, r.layout));
  for (const LayoutEstimate& e : res.ranked) EXPECT_EQ(layout_problem(req.model, e.layout), "");

  // Training: DP x micro-batch 4 must divide a global batch of 12 (DP=2 and DP=6 cannot); the
  // other layouts are planned.
  req.training = true;
  req.train.global_batch = 12;
  req.train.micro_batch = 4;
  req.train.seq_len = 1024;
  const PlanResult t = search(req);
  EXPECT_FALSE(t.ranked.empty());
  bool saw = false;
  for (const Rejected& r : t.rejected) {
    EXPECT_EQ(r.why, training_problem(req.model, r.layout, req.train));
    if (r.layout == Layout{1, 1, 6, 1}) {
      saw = true;
      EXPECT_EQ(r.why, "global batch 12 is not a multiple of DP x micro-batch = 6 x 4");
    }
  }
  EXPECT_TRUE(saw);

  // A workload no layout could run is the caller's mistake, reported as such.
  req.training = false;
  req.inference.batch = 0;
  try {
    search(req);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("[plan] batch, prompt and output lengths", 0), 0u)
        << e.what();
  }
}

TEST(Search, BadInputGetsClearErrors) {
  PlanRequest req;
  req.model = resolve_model("llama-2-70b");
  req.model_name = "llama-2-70b";
  ClusterOptions o;
  o.gpu = "a100-80g";
  o.gpus = 3;
  req.cluster = build_cluster(o);
  req.pinned = {3, 1, 0, 0};
  try {
    search(req);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("TP=3 does not divide the 64 attention heads"),
              std::string::npos)
        << e.what();
  }
  req.pinned = {2, 1, 0, 0};  // 2 does not divide 3 devices
  EXPECT_THROW(search(req), std::invalid_argument);
  EXPECT_THROW(parse_goal("fastest"), std::invalid_argument);
  EXPECT_THROW(parse_precision("fp12", "--dtype"), std::invalid_argument);
  o.gpu = "a100-90g";
  try {
    build_cluster(o);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("a100-90g"), std::string::npos);
  }
  o.gpu = "a100-80g";
  o.link = "carrier-pigeon";
  EXPECT_THROW(build_cluster(o), std::invalid_argument);
  o.link = "";
  o.gpus = 6;
  o.gpus_per_node = 4;
  EXPECT_THROW(build_cluster(o), std::invalid_argument);  // 6 is not nodes x 4
}

TEST(Search, TpStaysInsideNodesByDefault) {
  PlanRequest req;
  req.model = resolve_model("llama-2-70b");
  req.model_name = "llama-2-70b";
  ClusterOptions o;
  o.gpu = "h100-sxm";
  o.nodes = 2;
  o.gpus_per_node = 8;
  o.inter_node = "ib-ndr";
  req.cluster = build_cluster(o);
  req.inference = seed_workload(16);
  req.goal = Goal::Throughput;
  const PlanResult res = search(req);
  EXPECT_LE(res.ranked[0].layout.tp, 8);
  for (const LayoutEstimate& e : res.ranked) {
    if (e.layout.tp == 16) {
      EXPECT_FALSE(e.allowed);
      EXPECT_NE(e.reasons[0].find("crosses nodes"), std::string::npos) << e.reasons[0];
    }
    if (e.layout.pp >= 2 && e.layout.tp * e.layout.dp == 8) {
      EXPECT_EQ(e.pp_link, "ib-ndr");
    }
  }
}

TEST(Estimate, CpuDecodeIsWeightsOverBandwidthPlusCalibratedComm) {
  // What `parallm plan --gpu cpu --gpus 2 --calibrate comm.json --mem-bw 30 --rank-mem-bw 20`
  // predicts for the engine on this machine: the node streams 30 GB/s, shared by the ranks that
  // stream at once, and one rank alone reaches 20. TP=2: both ranks stream, 15 GB/s each, plus
  // 2 x layers all-reduces of (alpha + bytes / beta); PP=2 at batch 1: one stage streams at a
  // time, at min(30, 20) = 20 GB/s, plus the p2p messages.
  const ModelConfig c = resolve_model("tinyllama-1.1b");  // 22 layers, h 2048, 4 KV heads
  ClusterOptions co;
  co.gpu = "cpu";
  co.gpus = 2;
  const ClusterSpec cl = build_cluster(co);
  PlanOptions o;
  o.calibration =
      Calibration::from_json(nlohmann::json::parse(R"({"backend": "mpi", "world": 2, "ops": {
      "all_reduce": {"alpha_us": 20, "beta_gbps": 2.5}, "all_gather": {"alpha_us": 15, "beta_gbps": 2},
      "sendrecv": {"alpha_us": 5, "beta_gbps": 5}}})"),
                             "comm.json");
  o.mem_bw = 30e9;
  o.rank_mem_bw = 20e9;
  o.flops = 1e30;  // make compute free so that the check is about bytes and messages
  InferenceWorkload w;
  w.batch = 1;
  w.prompt_len = 1;
  w.output_len = 1;
  w.weights = Precision::BF16;
  w.kv_cache = Precision::FP32;
  w.activations = Precision::FP32;
  // ctx = 1 + 1/2 positions of KV read, plus the new token's.
  const double ctx = 1.5;

  const StageParams t0 = stage_params(c, {2, 1, 1, 1}, 0);
  const double kv2 = 2.0 * 22 * 2 * 64 * 4;  // 4 KV heads / 2 per rank, head_dim 64, fp32
  const double tp_bytes = (t0.total() - t0.embedding + 2048) * 2 + (ctx + 1) * kv2;
  const double tp_expect =
      tp_bytes / 15e9 + 45 * (20e-6 + 2048 * 4 / 2.5e9) + (15e-6 + 2 * 4 * 2 / 2e9);
  const LayoutEstimate tp = estimate_inference(c, cl, {2, 1, 1, 1}, w, o);
  EXPECT_NEAR(tp.tpot, tp_expect, 1e-9 * tp_expect);

  const StageParams p0 = stage_params(c, {1, 2, 1, 1}, 0), p1 = stage_params(c, {1, 2, 1, 1}, 1);
  const double kv1 = 2.0 * 11 * 4 * 64 * 4;
  const double s0 = ((p0.total() - p0.embedding + 2048) * 2 + (ctx + 1) * kv1) / 20e9;
  const double s1 = (p1.total() * 2 + (ctx + 1) * kv1) / 20e9;
  const double pp_expect = s0 + s1 + (5e-6 + 2048 * 4 / 5e9) + (5e-6 + 8 / 5e9);
  const LayoutEstimate pp = estimate_inference(c, cl, {1, 2, 1, 1}, w, o);
  EXPECT_NEAR(pp.tpot, pp_expect, 1e-9 * pp_expect);
  // Without the cap, the one streaming stage has the whole node.
  o.rank_mem_bw = 0;
  const LayoutEstimate pp_uncapped = estimate_inference(c, cl, {1, 2, 1, 1}, w, o);
  EXPECT_NEAR(pp_uncapped.tpot, pp_expect - (s0 + s1) / 3, 1e-9 * pp_expect);
  // With 2 micro-batches (batch 2) both stages stream at once: 15 GB/s each.
  EXPECT_NEAR(rank_mem_bw(cl, o, 2), 15e9, 1);
  // The CPU preset describes this machine: its online processors and its memory, as the kernel
  // lists them in /proc.
  EXPECT_TRUE(cl.device.is_cpu);
  std::ifstream cpuinfo("/proc/cpuinfo"), meminfo("/proc/meminfo");
  int processors = 0;
  double mem_total_kib = 0;
  for (std::string line; std::getline(cpuinfo, line);)
    processors += line.rfind("processor", 0) == 0;
  for (std::string key; meminfo >> key;) {
    if (key == "MemTotal:") {
      meminfo >> mem_total_kib;
      break;
    }
    meminfo.ignore(1 << 10, '\n');
  }
  ASSERT_GT(processors, 0);
  ASSERT_GT(mem_total_kib, 0);
  EXPECT_EQ(cl.device.cores, processors);
  EXPECT_DOUBLE_EQ(cl.device.mem_capacity, mem_total_kib * 1024);
}

// A CPU node streaming 30 GB/s, 20 for one rank alone, 200 GFLOP/s a rank.
PlanOptions cpu_node_rates() {
  PlanOptions o;
  o.mem_bw = 30e9;
  o.rank_mem_bw = 20e9;
  o.flops = 200e9;
  return o;
}

TEST(Estimate, CpuRanksOnTheirOwnClocksShareTheNodeOnlyWhileTheyStream) {
  // Two DP replicas on one CPU node (30 GB/s, one rank alone 20) each decode batch 4 on one rank.
  // A replica streams its bytes B for part u of its step and multiplies for the rest (F), and the
  // other replica streams at the same moment only u of the time: B / min(20, 30 / (1 + u)) + F,
  // u being the streaming part of that step. Sharing all the time (15 GB/s each) would be slower.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  const PlanOptions o = cpu_node_rates();
  const InferenceWorkload w4 = cpu_decode(4), w8 = cpu_decode(8);
  // One rank alone: B / 20 GB/s + F; with free arithmetic, B / 20 GB/s.
  const double alone = estimate_inference(c, cpu_cluster(1), {1, 1, 1, 1}, w4, o).tpot;
  PlanOptions free_flops = o;
  free_flops.flops = 1e30;
  const double b_time = estimate_inference(c, cpu_cluster(1), {1, 1, 1, 1}, w4, free_flops).tpot;
  const double bytes = b_time * 20e9, f_time = alone - b_time;
  ASSERT_GT(f_time, 0.2 * alone);
  double u = 1, step = 0;
  for (int i = 0; i < 200; ++i) {
    const double stream = bytes / std::min(20e9, 30e9 / (1 + u));
    step = stream + f_time;
    u = stream / step;
  }
  const LayoutEstimate dp = estimate_inference(c, cpu_cluster(2), {1, 1, 2, 1}, w8, o);
  EXPECT_NEAR(dp.tpot, step, 1e-4 * step);
  // The breakdown names the rate (plan's "per decode step" lines and --json's "detail").
  EXPECT_EQ(dp.decode_terms.at(0).detail,
            fmt::format("{:.1f} GB/s a rank", std::min(20.0, 30 / (1 + u))));
  EXPECT_GT(dp.tpot, alone * 1.01);
  EXPECT_LT(dp.tpot, (bytes / 15e9 + f_time) * 0.97);
  // With free arithmetic a replica streams all the time: the node's rate halved.
  EXPECT_NEAR(estimate_inference(c, cpu_cluster(2), {1, 1, 2, 1}, w8, free_flops).tpot,
              bytes / 15e9, 1e-6 * b_time);
  // PP=2 at batch 8: the stages' two micro-batches of 4 keep both streaming on their own clocks,
  // so the step is also below two micro-batches on the slower stage at 15 GB/s each.
  const LayoutEstimate pp = estimate_inference(c, cpu_cluster(2), {1, 2, 1, 1}, w8, o);
  EXPECT_LT(pp.tpot, (bytes / 15e9 + f_time) * 1.02 * 0.97);
  EXPECT_GT(pp.tpot, alone);
  // TP=2: both ranks run the same matmuls at once and share the node all the time (half the
  // bytes each at 15 GB/s), whatever the arithmetic.
  const LayoutEstimate tp = estimate_inference(c, cpu_cluster(2), {2, 1, 1, 1}, w8, o);
  const LayoutEstimate tp_free =
      estimate_inference(c, cpu_cluster(2), {2, 1, 1, 1}, w8, free_flops);
  double tp_comm = 0;
  for (const CostTerm& t : tp_free.decode_terms)
    if (t.name.rfind("tp ", 0) == 0) tp_comm += t.seconds;
  EXPECT_GT(tp_free.tpot - tp_comm, 0.45 * bytes / 15e9);
  EXPECT_LT(tp_free.tpot - tp_comm, 0.55 * bytes / 15e9);
  EXPECT_NEAR(tp.decode_compute - tp_free.decode_compute, f_time, 0.1 * f_time);
}

TEST(Estimate, CpuRanksSharingFewerCoresTakeTurns) {
  // TP=2 x PP=2 on 2 shared cores (--shared-cores 2: an emulated cluster on one machine) at
  // batch 8: the stages' 2 micro-batches would run at once, but only 2 of the 4 ranks run at a
  // time. A micro-batch of 4 reads every stage's weights on its way, so the 4 ranks' work is that
  // of TP=2 stepping batch 4 twice (the same bytes, FLOPs and all-reduces), done in turns on the
  // 2 cores, 2 ranks streaming at once as TP=2's do.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  PlanOptions o = cpu_node_rates();
  o.calibration =
      Calibration::from_json(nlohmann::json::parse(R"({"backend": "mpi", "world": 2, "ops": {
      "all_reduce": {"alpha_us": 0, "beta_gbps": 2}, "sendrecv": {"alpha_us": 5, "beta_gbps": 5}}})"),
                             "comm.json");
  const InferenceWorkload w8 = cpu_decode(8), w1 = cpu_decode(1);
  const double tp2 = estimate_inference(c, cpu_cluster(2), {2, 1, 1, 1}, cpu_decode(4), o).tpot;
  const LayoutEstimate own = estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w8, o);
  PlanOptions shared = o;
  shared.shared_cores = 2;
  const LayoutEstimate turns = estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w8, shared);
  ASSERT_EQ(turns.micro_batches, 2);
  EXPECT_NEAR(turns.tpot, 2 * tp2, 1e-9 * tp2);
  // A core a rank: the stages overlap, and only the node's memory, shared by 4, holds them back.
  EXPECT_GT(turns.tpot, 1.1 * own.tpot);
  // The breakdown names the wait: a step less one micro-batch's path (half of it here, and the
  // p2p hops).
  bool named = false;
  for (const CostTerm& t : turns.decode_terms)
    named |= t.name == "ranks taking turns on 2 shared cores" &&
             std::abs(t.seconds - turns.tpot / 2) < 0.01 * turns.tpot;
  EXPECT_TRUE(named);
  // Prefill of 8 prompts in 2 micro-batches: the same turns.
  EXPECT_GT(estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, workload(8, 64, 1), shared).ttft,
            1.2 * estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, workload(8, 64, 1), o).ttft);
  // At batch 1 one stage runs at a time: 2 cores are enough, nothing changes; nor with a core a
  // rank.
  EXPECT_DOUBLE_EQ(estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w1, shared).tpot,
                   estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w1, o).tpot);
  shared.shared_cores = 4;
  EXPECT_DOUBLE_EQ(estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w8, shared).tpot, own.tpot);
}

TEST(Estimate, TpGroupsTakingTurnsAtOnceLoseWhatTheCoreSharingProbeMeasured) {
  // bench comm --share-probe's efficiency e: where two TP groups have work at once on fewer
  // cores than their ranks (TP=2 x PP=2 at batch 8 on 2 shared cores), the ranks' turns take
  // their arithmetic and streaming over e; the collectives as before. At batch 1 one stage works
  // at a time, with a core a rank nobody takes turns, and TP=1 has no group collectives to wait
  // in: none of them changes.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  PlanOptions o = cpu_node_rates();
  const std::string cal = R"({"backend": "mpi", "world": 2, "ops": {
      "all_reduce": {"alpha_us": 0, "beta_gbps": 2}, "sendrecv": {"alpha_us": 5, "beta_gbps": 5}})";
  o.calibration = Calibration::from_json(nlohmann::json::parse(cal + "}"), "comm.json");
  PlanOptions lossy = o;
  lossy.calibration = Calibration::from_json(
      nlohmann::json::parse(cal + R"(, "core_sharing": {"efficiency": 0.8}})"), "comm.json");
  o.shared_cores = lossy.shared_cores = 2;
  const InferenceWorkload w8 = cpu_decode(8), w1 = cpu_decode(1);
  const LayoutEstimate plain = estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w8, o);
  const LayoutEstimate lost = estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w8, lossy);
  // The turns: 2 x (each stage's total), and the stages' arithmetic and streaming (the decode
  // compute, summed over the stages) again x (1/0.8 - 1), twice (two micro-batches of 2 TP ranks
  // over 2 cores).
  EXPECT_NEAR(lost.tpot - plain.tpot, 2 * plain.decode_compute * (1 / 0.8 - 1), 1e-6 * plain.tpot);
  bool named = false;
  for (const CostTerm& t : lost.decode_terms)
    named |= t.name == "ranks taking turns on 2 shared cores" &&
             t.detail.find("80% of perfect sharing") != std::string::npos;
  EXPECT_TRUE(named);
  EXPECT_DOUBLE_EQ(estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w1, lossy).tpot,
                   estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w1, o).tpot);
  PlanOptions own_cores = lossy, own_plain = o;
  own_cores.shared_cores = own_plain.shared_cores = 4;
  EXPECT_DOUBLE_EQ(estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w8, own_cores).tpot,
                   estimate_inference(c, cpu_cluster(4), {2, 2, 1, 1}, w8, own_plain).tpot);
  EXPECT_DOUBLE_EQ(estimate_inference(c, cpu_cluster(4), {1, 4, 1, 1}, w8, lossy).tpot,
                   estimate_inference(c, cpu_cluster(4), {1, 4, 1, 1}, w8, o).tpot);
}

TEST(Estimate, CpuGemvPassesOverTheWeightsAgainForEachFurtherFourTokens) {
  // --reread-bw: the CPU decode GEMV takes a step's tokens 4 at a time (kernels/matmul.h), the
  // weights from memory for the first 4 and from the caches for each further 4. One rank: from
  // batch 1 to 4 a step grows by the sequences' FLOPs alone; the fifth sequence adds its FLOPs
  // and one pass over the multiplied weights (every matrix but the looked-up embedding) at the
  // re-read rate; batch 8 no further pass, batch 9 one more. Without the rate, none.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  PlanOptions o = cpu_node_rates();
  auto tpot = [&](int64_t b, const PlanOptions& opt, Precision weights = Precision::BF16) {
    InferenceWorkload w = cpu_decode(b);
    w.weights = weights;
    return estimate_inference(c, cpu_cluster(1), {1, 1, 1, 1}, w, opt).tpot;
  };
  const double seq = tpot(2, o) - tpot(1, o);  // one sequence's FLOPs (and its KV cache read)
  const double matmul_bytes =
      double(c.param_count() - c.vocab_size * c.hidden_size) * 2;  // bf16, untied head
  PlanOptions re = o;
  re.reread_bw = 100e9;
  const double pass = matmul_bytes / 100e9;
  EXPECT_NEAR(tpot(4, re) - tpot(1, re), 3 * seq, 1e-6 * tpot(4, re));
  EXPECT_NEAR(tpot(5, re) - tpot(4, re), seq + pass, 0.02 * pass);
  EXPECT_NEAR(tpot(8, re) - tpot(5, re), 3 * seq, 1e-6 * tpot(8, re));
  EXPECT_NEAR(tpot(9, re) - tpot(8, re), seq + pass, 0.02 * pass);
  EXPECT_NEAR(tpot(5, o) - tpot(4, o), seq, 1e-6 * tpot(5, o));
  // The int8 GEMV is another kernel: no such pass.
  EXPECT_DOUBLE_EQ(tpot(5, re, Precision::INT8), tpot(5, o, Precision::INT8));
  // PP=2 at batch 8: 2 micro-batches of 4, each one pass: nothing added.
  const InferenceWorkload w8 = cpu_decode(8);
  EXPECT_DOUBLE_EQ(estimate_inference(c, cpu_cluster(2), {1, 2, 1, 1}, w8, re).tpot,
                   estimate_inference(c, cpu_cluster(2), {1, 2, 1, 1}, w8, o).tpot);
  // Accelerators: the flag is CPU's alone.
  const ClusterSpec a100 = cluster_of("a100-80g", 1);
  EXPECT_DOUBLE_EQ(estimate_inference(c, a100, {1, 1, 1, 1}, cpu_decode(8), re).tpot,
                   estimate_inference(c, a100, {1, 1, 1, 1}, cpu_decode(8), o).tpot);
}

TEST(Estimate, StagesAcrossNodesTakeTheirActivationsIn1OverTpBlocks) {
  // The engine's --pp-split auto: TP inside each node, the stages on different nodes: each TP rank
  // sends its 1/TP block of a micro-batch's rows across, the next stage all-gathers them over its
  // TP link. A GPU sends its block through its own port; a CPU node's ranks share the node's, so
  // the rows cross once. PP alone: whole rows, no all-gather.
  const ModelConfig c = resolve_model("llama-2-70b");
  auto cluster = [](const std::string& gpu, int per_node, const std::string& inter) {
    ClusterOptions o;
    o.gpu = gpu;
    o.nodes = 2;
    o.gpus_per_node = per_node;
    o.inter_node = inter;
    return build_cluster(o);
  };
  auto hop = [&](const ClusterSpec& cl, Layout l, const InferenceWorkload& w,
                 const PlanOptions& o = {}) {
    const LayoutEstimate e = estimate_inference(c, cl, l, w, o);
    for (const CostTerm& t : e.decode_terms)
      if (t.name == "pp p2p") return t;
    ADD_FAILURE() << "no pp p2p term";
    return CostTerm{};
  };
  const InferenceWorkload w = seed_workload(8);
  const double rows = 4 * double(c.hidden_size) * 2;  // a micro-batch (of 2) of 4 fp16 rows
  const ClusterSpec gpus = cluster("a100-80g", 8, "ib-hdr");
  const CostTerm split = hop(gpus, {8, 2, 1, 1}, w);
  EXPECT_EQ(split.bytes, rows);
  EXPECT_NE(split.detail.find("1/TP blocks all-gathered"), std::string::npos) << split.detail;
  EXPECT_NEAR(split.seconds,
              collective_cost(Collective::P2P, rows / 8, 2, gpus.inter).seconds +
                  collective_cost(Collective::AllGather, rows, 8, gpus.nvlink).seconds,
              1e-12);
  // PP alone across the nodes: the whole rows, as before.
  const ClusterSpec two = cluster("a100-80g", 1, "ib-hdr");
  const CostTerm whole = hop(two, {1, 2, 1, 1}, w);
  EXPECT_EQ(whole.detail, two.inter.name);
  EXPECT_NEAR(whole.seconds, collective_cost(Collective::P2P, rows, 2, two.inter).seconds, 1e-12);
  // CPU nodes of 2 ranks: the pair's halves queue on the node's link (the rows once), then the
  // pair all-gathers through shared memory.
  const ModelConfig small = resolve_model("tinyllama-1.1b");
  const ClusterSpec cpus = cluster("cpu", 2, "eth-10g");
  const InferenceWorkload cw = cpu_decode(8);
  const double cpu_rows = 4 * double(small.hidden_size) * 4;  // a micro-batch of 4 f32 rows
  const LayoutEstimate ce = estimate_inference(small, cpus, {2, 2, 1, 1}, cw, cpu_node_rates());
  double cpu_hop = -1;
  for (const CostTerm& t : ce.decode_terms)
    if (t.name == "pp p2p") cpu_hop = t.seconds;
  EXPECT_NEAR(cpu_hop,
              collective_cost(Collective::P2P, cpu_rows, 2, cpus.inter).seconds +
                  collective_cost(Collective::AllGather, cpu_rows, 2, cpus.pcie).seconds,
              1e-12);
}

TEST(Estimate, ArrivalSkewIsAShareOfTheWorkBetweenTpCollectives) {
  // bench comm's probe measured, on 2 ranks, the slowest ending a slice 5% of it after the mean
  // streaming and 10% computing. A TP group's collectives wait that for its slowest rank: the
  // step grows by 5% of its streaming time and 10% of its arithmetic, and for 4 ranks by
  // E[max of 4 normals] / E[max of 2] = 1.0294 / 0.5642 times that. No TP: no wait.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  const PlanOptions o = cpu_node_rates();
  const char* ops = R"("ops": {"all_reduce": {"alpha_us": 20, "beta_gbps": 1},
      "sendrecv": {"alpha_us": 5, "beta_gbps": 1}})";
  auto with = [&](const std::string& skew, double flops) {
    PlanOptions p = o;
    p.flops = flops;
    p.calibration = Calibration::from_json(
        nlohmann::json::parse("{\"backend\": \"mpi\", \"world\": 2, " + skew + ops + "}"),
        "comm.json");
    return p;
  };
  const std::string skew = R"("arrival_skew": {"ranks": 2, "stream": 0.05, "compute": 0.10}, )";
  const InferenceWorkload w = cpu_decode(8);
  for (int tp : {2, 4}) {
    const ClusterSpec cl = cpu_cluster(tp);
    const Layout l{tp, 1, 1, 1};
    const LayoutEstimate plain = estimate_inference(c, cl, l, w, with("", o.flops));
    const LayoutEstimate skewed = estimate_inference(c, cl, l, w, with(skew, o.flops));
    // The streaming and arithmetic parts of the step, from the same plan with free arithmetic.
    const double mem = estimate_inference(c, cl, l, w, with("", 1e30)).decode_compute;
    const double flops = plain.decode_compute - mem;
    ASSERT_GT(flops, 0.2 * mem);
    const double scale = tp == 2 ? 1.0 : 1.0293754 / 0.5641896;
    const double want = scale * (0.05 * mem + 0.10 * flops);
    EXPECT_NEAR(skewed.tpot - plain.tpot, want, 1e-6 * want) << tp;
    const auto term = std::find_if(skewed.decode_terms.begin(), skewed.decode_terms.end(),
                                   [](const CostTerm& t) { return t.name == "tp arrival skew"; });
    ASSERT_NE(term, skewed.decode_terms.end()) << tp;
    EXPECT_NEAR(term->seconds, skewed.tpot - plain.tpot, 1e-12);
    EXPECT_EQ(term->count, 2 * c.num_hidden_layers + 2);  // the layers', embedding's, sampler's
    EXPECT_GT(skewed.ttft, plain.ttft);                   // prefill's slices wait too
  }
  // PP alone or one rank: no TP collective to wait at.
  for (Layout l : {Layout{1, 2, 1, 1}, Layout{1, 1, 2, 1}})
    EXPECT_DOUBLE_EQ(estimate_inference(c, cpu_cluster(2), l, w, with(skew, o.flops)).tpot,
                     estimate_inference(c, cpu_cluster(2), l, w, with("", o.flops)).tpot);
}

TEST(Estimate, ATokenBucketLinkPassesItsBurstAfterCompute) {
  // A shaped link lets burst_bytes through at once after an idle spell. In decode every TP
  // all-reduce (44 in the layers, 1 in the embedding) and the PP hop follow compute long enough to
  // refill it, so each saves burst / beta against the same calibration without the burst.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  const ClusterSpec cl = cpu_cluster(2);
  const char* ops = R"("ops": {"all_reduce": {"alpha_us": 20, "beta_gbps": 0.01},
      "sendrecv": {"alpha_us": 5, "beta_gbps": 0.02}})";
  PlanOptions o;
  o.mem_bw = 30e9;
  o.rank_mem_bw = 20e9;
  o.flops = 1e30;
  const InferenceWorkload w = cpu_decode(1);
  auto tpot = [&](const std::string& extra, Layout l) {
    o.calibration =
        Calibration::from_json(nlohmann::json::parse("{\"backend\": \"mpi\", \"world\": 2, " +
                                                     extra + std::string(ops) + "}"),
                               "comm.json");
    return estimate_inference(c, cl, l, w, o).tpot;
  };
  const double burst = 4096;  // half of one token's 2048 f32
  EXPECT_NEAR(tpot("", {2, 1, 1, 1}) - tpot("\"burst_bytes\": 4096, ", {2, 1, 1, 1}),
              45 * burst / 0.01e9, 1e-9);
  EXPECT_NEAR(tpot("", {1, 2, 1, 1}) - tpot("\"burst_bytes\": 4096, ", {1, 2, 1, 1}),
              burst / 0.02e9, 1e-9);
  // A burst larger than the message saves the message's bytes, never more.
  EXPECT_NEAR(tpot("", {1, 2, 1, 1}) - tpot("\"burst_bytes\": 1e9, ", {1, 2, 1, 1}),
              2048 * 4 / 0.02e9, 1e-9);
  EXPECT_THROW(tpot("\"burst_bytes\": -1, ", {2, 1, 1, 1}), std::exception);
}

TEST(Estimate, PipelineMicroBatchesQueueOnASlowStageLink) {
  // PP=2 at batch 8 runs 2 micro-batches of 4; over a link of 100 kB/s each one's activations
  // (4 x 2048 f32 = 32 KiB) take ~330 ms, far longer than either stage's ~70 ms, and the second
  // waits for the first on the link: the step is 2 hops, not one hop plus the stages.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  const ClusterSpec cl = cpu_cluster(2);
  PlanOptions o;
  o.calibration =
      Calibration::from_json(nlohmann::json::parse(R"({"backend": "mpi", "world": 2, "ops": {
      "all_reduce": {"alpha_us": 20, "beta_gbps": 0.001}, "sendrecv": {"alpha_us": 40, "beta_gbps": 0.0001}}})"),
                             "comm.json");
  o.mem_bw = 30e9;
  o.rank_mem_bw = 20e9;
  o.flops = 1e30;
  const InferenceWorkload w = cpu_decode(8);
  const LayoutEstimate pp = estimate_inference(c, cl, {1, 2, 1, 1}, w, o);
  ASSERT_EQ(pp.micro_batches, 2);
  const double hop = 40e-6 + 4 * 2048 * 4 / 1e5;
  EXPECT_NEAR(pp.tpot, 2 * hop, 1e-9 * pp.tpot);
  // The path (stages + one hop + the tokens back) is shorter: the rest is queueing on the link.
  EXPECT_GT(pp.decode_pipeline_wait, 0.3 * hop);
  bool named = false;
  for (const CostTerm& t : pp.decode_terms)
    named |= t.name == "micro-batches queueing on a stage link";
  EXPECT_TRUE(named);
  // On a fast link the stages are the bottleneck again: two micro-batches on the slower stage.
  o.calibration->ops["sendrecv"] = {5e-6, 50e9};
  const LayoutEstimate fast = estimate_inference(c, cl, {1, 2, 1, 1}, w, o);
  EXPECT_LT(fast.tpot, 0.5 * pp.tpot);
  bool at_stages = false;
  for (const CostTerm& t : fast.decode_terms)
    at_stages |= t.name == "micro-batches queueing at stages";
  EXPECT_TRUE(at_stages);
}

TEST(Estimate, ACpuStepIsItsBytesPlusItsFlopsAnAcceleratorsTheLarger) {
  // One CPU rank at batch 8: the step is the time to read the weights plus the time to multiply,
  // each computed alone (the other rate made infinite); an A100's is the larger of the two.
  const ModelConfig c = resolve_model("tinyllama-1.1b");
  const InferenceWorkload w = cpu_decode(8);
  auto tpot = [&](const ClusterSpec& cl, double bw, double flops) {
    PlanOptions o;
    o.mem_bw = bw;
    o.flops = flops;
    return estimate_inference(c, cl, {1, 1, 1, 1}, w, o).tpot;
  };
  const ClusterSpec cpu = cpu_cluster(1);
  const double bytes = tpot(cpu, 30e9, 1e30), flops = tpot(cpu, 1e30, 100e9);
  EXPECT_GT(flops, 0.5 * bytes);  // both matter
  EXPECT_NEAR(tpot(cpu, 30e9, 100e9), bytes + flops, 1e-9 * (bytes + flops));
  const ClusterSpec gpu = cluster_of("a100-80g", 1);
  const double g_bytes = tpot(gpu, 30e9, 1e30), g_flops = tpot(gpu, 1e30, 100e9);
  EXPECT_NEAR(tpot(gpu, 30e9, 100e9), std::max(g_bytes, g_flops), 1e-9 * (g_bytes + g_flops));
}

TEST(Estimate, TrainingStepBubbleAndMfu) {
  const ModelConfig c = resolve_model("llama-2-7b");
  ClusterOptions co;
  co.gpu = "a100-80g";
  co.gpus = 8;
  const ClusterSpec cl = build_cluster(co);
  TrainingWorkload w;
  w.global_batch = 64;
  w.micro_batch = 1;
  w.seq_len = 4096;
  const LayoutEstimate e = estimate_training(c, cl, {2, 4, 1, 1}, w, {});
  EXPECT_EQ(e.micro_batches, 64);
  // 1F1B's bubble: (p-1)/(m+p-1) when p2p is free and the stages balanced; p2p and the LM head's
  // stage (8 layers and the 32000 x 4096 head: the others wait for it) only add to it.
  const double formula = pipeline::bubble_formula(pipeline::ScheduleKind::OneFOneB, 4, 64);
  EXPECT_GE(e.bubble_fraction, formula - 1e-12);
  EXPECT_LT(e.bubble_fraction, formula + 0.06);
  EXPECT_DOUBLE_EQ(e.peak_in_flight, 4);  // stage 0 holds p micro-batches
  EXPECT_GT(e.mfu, 0.2);
  EXPECT_LT(e.mfu, 0.6);  // below the 60% GEMM efficiency assumed
  EXPECT_NEAR(e.tokens_per_s, 64 * 4096 / e.step_time, 1e-6 * e.tokens_per_s);
  // GPipe holds all 64 micro-batches: more activation memory, same bubble.
  w.schedule = pipeline::ScheduleKind::GPipe;
  const LayoutEstimate g = estimate_training(c, cl, {2, 4, 1, 1}, w, {});
  EXPECT_DOUBLE_EQ(g.peak_in_flight, 64);
  EXPECT_GT(g.memory.activations, 10 * e.memory.activations);
  // Interleaving shrinks the bubble.
  w.schedule = pipeline::ScheduleKind::Interleaved;
  w.chunks = 2;
  const LayoutEstimate i = estimate_training(c, cl, {2, 4, 1, 1}, w, {});
  EXPECT_LT(i.bubble_fraction, e.bubble_fraction);
  // A global batch DP x micro-batch does not divide is rejected by name.
  w.global_batch = 10;
  try {
    estimate_training(c, cl, {1, 1, 8, 1}, w, {});
    FAIL();
  } catch (const std::invalid_argument& ex) {
    EXPECT_NE(std::string(ex.what()).find("global batch 10"), std::string::npos) << ex.what();
  }
}

// The DP gradient all-reduce in buckets during the last micro-batch's backward (train/dp.cpp):
// only what the backward does not hide adds to the step.
TEST(Estimate, TrainingDpGradientsOverlapTheBackwardInBuckets) {
  const ModelConfig c = resolve_model("llama-2-7b");
  const ClusterSpec cl = cluster_of("a100-80g", 8);
  TrainingWorkload w;
  w.global_batch = 8;
  const Layout dp8{1, 1, 8, 1};
  const LayoutEstimate e = estimate_training(c, cl, dp8, w, {});
  // 13.5 GB of bf16 gradients in 25 MB buckets; NVLink reduces them faster than the backward
  // makes them, so only the last bucket's reduction is left after it.
  EXPECT_EQ(e.dp_buckets, int(2 * c.param_count() / 25e6));
  EXPECT_GT(e.dp_comm_time, 0.01 * e.step_time);
  EXPECT_LT(e.dp_comm_exposed, 0.01 * e.dp_comm_time);
  EXPECT_GT(e.dp_comm_exposed, 0.5 * e.dp_comm_time / e.dp_buckets);
  // Reduced after the backward (--no-overlap), or with ZeRO: all of it adds to the step.
  w.overlap_grad_reduce = false;
  const LayoutEstimate after = estimate_training(c, cl, dp8, w, {});
  EXPECT_EQ(after.dp_buckets, 1);
  EXPECT_NEAR(after.dp_comm_exposed, after.dp_comm_time, 1e-12);
  EXPECT_NEAR(after.step_time - e.step_time, after.dp_comm_exposed - e.dp_comm_exposed,
              1e-9 * e.step_time);
  w.overlap_grad_reduce = true;
  w.zero = 1;
  const LayoutEstimate z = estimate_training(c, cl, dp8, w, {});
  EXPECT_NEAR(z.dp_comm_exposed, z.dp_comm_time, 1e-12);
  w.zero = 0;
  // One bucket: nothing to overlap.
  w.bucket_bytes = 1e12;
  const LayoutEstimate one = estimate_training(c, cl, dp8, w, {});
  EXPECT_EQ(one.dp_buckets, 1);
  EXPECT_NEAR(one.dp_comm_exposed, one.dp_comm_time, 1e-12);
  // Over a slow link (two nodes on 10 Gb Ethernet) the reductions outlast the backward: the step
  // waits for all but what ran under the backward, and at most the backward is hidden.
  ClusterOptions co;
  co.gpu = "a100-80g";
  co.gpus = 16;
  co.nodes = 2;
  co.gpus_per_node = 8;
  co.inter_node = "eth-10g";
  const ClusterSpec slow = build_cluster(co);
  w.bucket_bytes = 25e6;
  w.global_batch = 16;
  const LayoutEstimate s = estimate_training(c, slow, {1, 1, 16, 1}, w, {});
  EXPECT_GT(s.dp_comm_time, 2 * s.backward_time);
  EXPECT_LT(s.dp_comm_exposed, s.dp_comm_time);
  EXPECT_GE(s.dp_comm_exposed, s.dp_comm_time - s.backward_time - 1e-9);
}

// CPU ranks: a bucket's reduction takes a share of the rank's cores from the backward (one more
// thread beside its t), so the overlap hides less than on a GPU.
TEST(Estimate, TrainingDpOverlapOnCpuRanksSlowsTheBackward) {
  const ModelConfig c = resolve_model("llama-2-7b");
  const ClusterSpec cl = cpu_cluster(2);
  TrainingWorkload w;
  w.global_batch = 2;
  w.seq_len = 512;
  w.precision = Precision::FP32;
  PlanOptions o;
  o.training_rates = {1e11, 1e11, 1e11, 1e11};
  o.mem_bw = 20e9;
  auto with_threads = [&](int t) {
    o.training_rates.threads = t;
    return estimate_training(c, cl, {1, 1, 2, 1}, w, o);
  };
  const LayoutEstimate one = with_threads(1), many = with_threads(1000000);
  ASSERT_GT(one.dp_buckets, 100);
  ASSERT_LT(many.dp_comm_exposed, 0.9 * many.dp_comm_time);  // mostly hidden...
  // ...but at one thread a rank the backward runs at half speed while a bucket is reduced: the
  // step gains half of what ran under it (the buckets reduced before the backward would end).
  const double hidden = many.dp_comm_time - many.dp_comm_exposed;
  EXPECT_NEAR(one.dp_comm_exposed - many.dp_comm_exposed, 0.5 * hidden, 0.05 * hidden);
  EXPECT_NEAR(one.step_time - many.step_time, one.dp_comm_exposed - many.dp_comm_exposed,
              1e-9 * one.step_time);

  // A calibration's beside_compute (bench comm --load): a bucket reduced under the backward costs
  // the loaded all-reduce and the backward keeps the measured share of its speed. Loaded = idle
  // and a speed of 1 is the free overlap; slower buckets or a slower backward expose more, and
  // what a step exposes is still at most the whole all-reduce after the backward plus what the
  // backward lost.
  o.training_rates.threads = 1;
  Calibration cal;
  cal.backend = "mpi";
  cal.ops["all_reduce"] = {20e-6, 2e9};
  auto with = [&](double alpha, double beta, double speed) {
    Calibration k = cal;
    k.beside_compute.threads = 1;
    k.beside_compute.compute_speed = speed;
    k.beside_compute.ops["all_reduce"] = {alpha, beta};
    o.calibration = k;
    return estimate_training(c, cl, {1, 1, 2, 1}, w, o);
  };
  o.calibration = cal;
  const LayoutEstimate plain = estimate_training(c, cl, {1, 1, 2, 1}, w, o);  // t / (t + 1)
  const LayoutEstimate free = with(20e-6, 2e9, 1.0), half = with(20e-6, 2e9, 0.5),
                       slow = with(5e-3, 1e9, 0.5);
  ASSERT_GT(free.dp_buckets, 100);
  EXPECT_EQ(free.dp_comm_time, plain.dp_comm_time);  // the all-reduce alone is the same
  EXPECT_LT(free.dp_comm_exposed, 0.9 * free.dp_comm_time);
  // The same speed as the default's one thread: the same estimate.
  EXPECT_NEAR(half.dp_comm_exposed, plain.dp_comm_exposed, 1e-9);
  EXPECT_GT(half.dp_comm_exposed, free.dp_comm_exposed);
  EXPECT_GT(slow.dp_comm_exposed, half.dp_comm_exposed);
  EXPECT_LE(slow.dp_comm_exposed, slow.dp_comm_time + slow.backward_time + 1e-9);
  std::string detail;
  for (const CostTerm& t : slow.step_terms)
    if (t.name.rfind("dp gradient", 0) == 0) detail = t.detail;
  EXPECT_NE(detail.find("calibrated"), std::string::npos) << detail;
}

}  // namespace
}  // namespace parallm::plan
