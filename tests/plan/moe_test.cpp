// The planner's expert parallelism against the engine, exactly: the weight bytes it gives each
// (TP, EP) rank are the bytes LlamaModel loads there, and its all-to-all (and all-gather) bytes are
// what the EP group's CommStats count on a real run of the model's layers (a prefill step of two
// sequences, then decode steps), given the rows the router sent off-rank.
#include <gtest/gtest.h>

#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/comm/stats.h"
#include "parallm/engine/kv_cache.h"
#include "parallm/model/init_model.h"
#include "parallm/model/llama.h"
#include "parallm/model/weights.h"
#include "parallm/plan/cluster.h"
#include "parallm/plan/estimate.h"
#include "parallm/plan/memory.h"
#include "parallm/plan/model_presets.h"
#include "parallm/plan/moe.h"
#include "parallm/plan/search.h"
#include "test_util.h"

namespace parallm::plan {
namespace {

using testing::run_parallm;
using testing::TempDir;

struct RankRun {
  int tp_rank = 0, ep_rank = 0;
  uint64_t loaded = 0;
  double planned = 0;
  uint64_t a2a_sent = 0, a2a_recv = 0, gather_sent = 0;
  int64_t off_rows = 0;  // rows this rank sent to another EP rank
};

// Steps of the run: one prefill of two prompts (5 + 3 tokens), then three decode steps of both.
const std::vector<int64_t> kSteps = {8, 2, 2, 2};

// Runs kSteps through the model's layers: the same inputs on every rank (attention is replicated
// over EP, and TP ranks hold the same tokens), varied so that the router spreads them.
void run_steps(LlamaModel& model, const ModelConfig& c) {
  KvCache kv(model.local_layers(), 2, 16, model.local_kv_dim());
  Workspace ws = model.make_workspace(8);
  std::vector<float> x(8 * c.hidden_size);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float((i * 37) % 101) / 50.0f - 1.0f;
  model.forward_layers(x.data(), {{0, 0, 5}, {1, 0, 3}}, kv, ws);
  for (int s = 0; s < 3; ++s) {
    for (size_t i = 0; i < 2 * size_t(c.hidden_size); ++i)
      x[i] = float((i * 13 + s * 7) % 89) / 40.0f - 1.0f;
    model.forward_layers(x.data(), {{0, 5 + s, 1}, {1, 3 + s, 1}}, kv, ws);
  }
}

std::vector<RankRun> run_layout(const std::string& dir, int tp, int ep) {
  ModelConfig config;
  open_model(dir, &config);
  std::mutex mu;
  std::vector<RankRun> out;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(tp * ep, lo, [&](comm::Group world) {
    comm::Mesh mesh(world, {tp, 1, ep, ep});
    ModelConfig c;
    auto source = open_model(dir, &c);
    LlamaOptions mo;
    mo.weight_dtype = DType::BF16;
    mo.ep = mesh.ep();
    LlamaModel model(c, *source, mesh.tp(), mo);
    RankRun r;
    r.tp_rank = mesh.tp_rank();
    r.ep_rank = mesh.ep_rank();
    r.loaded = model.weight_bytes();
    r.planned = rank_weight_bytes(c, {tp, 1, ep, ep}, Precision::BF16, 0, r.tp_rank, r.ep_rank);

    const comm::KindStats a0 = mesh.ep().stats().get(comm::Kind::AllToAll);
    const comm::KindStats g0 = mesh.ep().stats().get(comm::Kind::AllGather);
    run_steps(model, c);
    const comm::KindStats a1 = mesh.ep().stats().get(comm::Kind::AllToAll);
    const comm::KindStats g1 = mesh.ep().stats().get(comm::Kind::AllGather);
    r.a2a_sent = a1.bytes_sent - a0.bytes_sent;
    r.a2a_recv = a1.bytes_recv - a0.bytes_recv;
    r.gather_sent = g1.bytes_sent - g0.bytes_sent;
    const std::vector<int64_t> sent = model.moe_rows_sent();
    for (size_t q = 0; q < sent.size(); ++q)
      if (int(q) != r.ep_rank) r.off_rows += sent[q];
    std::lock_guard<std::mutex> lock(mu);
    out.push_back(r);
  });
  return out;
}

// A random bf16 model of `shape` in tmp; its config into *c.
std::string make_model(const TempDir& tmp, const std::string& shape, ModelConfig* c) {
  const std::string dir = tmp.file(shape);
  auto init = run_parallm("init-model --shape " + shape + " --seed 3 --dtype bf16 --out " + dir);
  EXPECT_EQ(init.exit_code, 0) << init.output;
  open_model(dir, c);
  return dir;
}

void check_family(const std::string& shape) {
  TempDir tmp;
  ModelConfig c;
  const std::string dir = make_model(tmp, shape, &c);
  const int64_t layers = moe_layers(c, 0, c.num_hidden_layers);
  for (auto [tp, ep] : {std::pair{1, 2}, {1, 3}, {2, 2}}) {
    SCOPED_TRACE(shape + " tp " + std::to_string(tp) + " ep " + std::to_string(ep));
    const std::vector<RankRun> runs = run_layout(dir, tp, ep);
    ASSERT_EQ(runs.size(), size_t(tp * ep));
    for (int t = 0; t < tp; ++t) {
      uint64_t a2a = 0, a2a_recv = 0, gather = 0;
      int64_t off = 0;
      for (const RankRun& r : runs) {
        if (r.tp_rank != t) continue;
        // Memory per rank: exactly the loaded bytes.
        EXPECT_EQ(r.planned, double(r.loaded)) << "tp rank " << t << " ep rank " << r.ep_rank;
        a2a += r.a2a_sent;
        a2a_recv += r.a2a_recv;
        gather += r.gather_sent;
        off += r.off_rows;
      }
      ASSERT_GT(off, 0);  // the check below would not see the rows' bytes otherwise
      const MoeStepBytes want = moe_run_bytes(c, ep, kSteps, layers, double(off));
      EXPECT_EQ(double(a2a), want.all_to_all()) << "tp rank " << t;
      EXPECT_EQ(a2a_recv, a2a);  // everything sent is received within the group
      EXPECT_EQ(double(gather), want.gather) << "tp rank " << t;
      // Per step it is the sum of the step formulas (off split any way: linear in it).
      double by_step = 0;
      for (int64_t T : kSteps) by_step += moe_step_bytes(c, ep, T, 0).total() * double(layers);
      const MoeStepBytes rows = moe_step_bytes(c, ep, 0, double(off));
      by_step += rows.dispatch + rows.combine;
      EXPECT_EQ(by_step, want.total());
    }
  }
}

TEST(PlanMoe, MixtralWeightsAndAllToAllBytesAreTheEngines) { check_family("mixtral-tiny"); }

TEST(PlanMoe, Qwen2MoeWeightsAndAllToAllBytesAreTheEngines) { check_family("qwen2-moe-tiny"); }

// vLLM's --enable-expert-parallel layout (whole experts over the TP ranks): the planner's memory
// per rank is what each rank loads, and its all-reduce formula is what group ep_tp's CommStats
// count on the same run of steps; every routed row is multiplied exactly once over the ranks.
TEST(PlanMoe, EnableExpertParallelWeightsAndAllReduceBytesAreTheEngines) {
  for (const std::string shape : {"mixtral-tiny", "qwen2-moe-tiny"}) {
    TempDir tmp;
    ModelConfig c;
    const std::string dir = make_model(tmp, shape, &c);
    const int64_t layers = moe_layers(c, 0, c.num_hidden_layers);
    int64_t tokens = 0;
    for (int64_t T : kSteps) tokens += T;
    for (int tp : {2, 4}) {
      SCOPED_TRACE(shape + " tp " + std::to_string(tp));
      double want_sent = 0, want_payload = 0;
      for (int64_t T : kSteps) {
        want_sent += moe_all_reduce_step_bytes(c, tp, T).sent * double(layers);
        want_payload += moe_all_reduce_step_bytes(c, tp, T).payload * double(layers);
      }
      EXPECT_EQ(want_payload, double(tokens * c.num_experts_per_tok * c.hidden_size * 4 * layers));
      std::mutex mu;
      std::vector<int64_t> rows(c.num_local_experts, 0);
      comm::LaunchOptions lo;
      lo.backend = "local";
      lo.timeout_s = 60;
      comm::launch(tp, lo, [&](comm::Group world) {
        comm::Mesh mesh(world, {tp, 1, 1, 1});
        ModelConfig cc;
        auto source = open_model(dir, &cc);
        LlamaOptions mo;
        mo.weight_dtype = DType::BF16;
        mo.experts_over_tp = true;
        LlamaModel model(cc, *source, mesh.tp(), mo);
        const double planned =
            rank_weight_bytes(cc, {tp, 1, 1, 1}, Precision::BF16, 0, mesh.tp_rank(), 0, true);
        const comm::KindStats a0 = model.expert_group().stats().get(comm::Kind::AllReduce);
        run_steps(model, cc);
        const comm::KindStats a1 = model.expert_group().stats().get(comm::Kind::AllReduce);
        std::lock_guard<std::mutex> lock(mu);
        EXPECT_EQ(planned, double(model.weight_bytes())) << "tp rank " << mesh.tp_rank();
        EXPECT_EQ(double(a1.bytes_sent - a0.bytes_sent), want_sent) << "tp rank " << mesh.tp_rank();
        EXPECT_EQ(a1.calls - a0.calls, uint64_t(kSteps.size()) * uint64_t(layers));
        const std::vector<int64_t> mine = model.moe_expert_rows();
        for (size_t e = 0; e < mine.size(); ++e) rows[e] += mine[e];
      });
      int64_t total = 0;
      for (int64_t r : rows) total += r;
      EXPECT_EQ(total, tokens * c.num_experts_per_tok * layers);
    }
  }
}

TEST(PlanMoe, StepFormulaAndExpectation) {
  ModelConfig c;
  c.hidden_size = 64;
  c.num_local_experts = 8;
  c.num_experts_per_tok = 2;
  // EP 3 holds 3, 3, 2 experts; T = 7 splits 2, 2, 3 (ShardSpec::even).
  EXPECT_DOUBLE_EQ(moe_expected_off_rank_rows(c, 3, 7),
                   2 * 2 * (5.0 / 8) + 2 * 2 * (5.0 / 8) + 3 * 2 * (6.0 / 8));
  const MoeStepBytes b = moe_step_bytes(c, 3, 7, 10);
  EXPECT_EQ(b.counts, 3 * 2 * 8);
  EXPECT_EQ(b.dispatch, 10 * 66 * 4);
  EXPECT_EQ(b.combine, 10 * 64 * 4);
  EXPECT_EQ(b.gather, 3 * 2 * 3 * 64 * 4);  // padded to ceil(7 / 3) = 3 tokens
  EXPECT_EQ(moe_step_bytes(c, 1, 7).total(), 0);
  EXPECT_THROW(moe_step_bytes(c, 9, 7), std::invalid_argument);
  EXPECT_THROW(moe_step_bytes(c, 2, -1), std::invalid_argument);
  ModelConfig dense;
  dense.hidden_size = 64;
  EXPECT_THROW(moe_step_bytes(dense, 2, 1), std::invalid_argument);
}

// init-model's mixtral-tiny shape (8 experts, top 2, hidden 64, FFN 96, 2 layers, 4 heads over 2
// KV heads), as a config.json of it reads.
ModelConfig tiny_mixtral() {
  ModelConfig c = shape_preset("mixtral-tiny");
  c.model_type = "mixtral";
  return c;
}

TEST(PlanMoe, DecodeEstimateSendsTheEnginesExpectedRows) {
  // The ranking's decode term at f32 activations, EP = DP = 2, one sequence per replica: each
  // device sends, per token, its share of the engine's dispatch and return bytes (plan/moe.h) for
  // a step of both replicas' tokens with routing spread evenly, in every sparse layer.
  const ModelConfig c = tiny_mixtral();
  ClusterOptions o;
  o.gpu = "a100-80g";
  o.gpus = 2;
  o.link = "nvlink";
  InferenceWorkload w;
  w.batch = 2;
  w.prompt_len = 8;
  w.output_len = 8;
  w.weights = w.kv_cache = w.activations = Precision::FP32;
  const LayoutEstimate e = estimate_inference(c, build_cluster(o), {1, 1, 2, 2}, w, {});
  const MoeStepBytes b = moe_step_bytes(c, 2, 2);
  EXPECT_DOUBLE_EQ(e.comm_bytes_per_token, 2 * (b.dispatch + b.combine) / 2);
}

// ---- the search and vLLM's --enable-expert-parallel layout (experts over the TP ranks) ----

PlanRequest request_for(const ModelConfig& c, int gpus, int64_t batch) {
  PlanRequest req;
  req.model = c;
  req.model_name = "test";
  ClusterOptions o;
  o.gpu = "a100-80g";
  o.gpus = gpus;
  o.link = "nvlink";
  req.cluster = build_cluster(o);
  req.inference.batch = batch;
  req.inference.prompt_len = 8;
  req.inference.output_len = 8;
  return req;
}

const LayoutEstimate* find(const PlanResult& r, const Layout& l) {
  for (const LayoutEstimate& e : r.ranked)
    if (e.layout == l) return &e;
  return nullptr;
}

TEST(PlanMoe, ExpertsOverTpAreRankedForMoeInferenceOnly) {
  const ModelConfig moe = tiny_mixtral();
  // 4 devices: TP 2 and TP 4 (<= 8 experts) with the experts over TP, beside plain TP.
  const PlanResult r = search(request_for(moe, 4, 4));
  int over = 0;
  for (const LayoutEstimate& e : r.ranked) {
    if (!e.layout.experts_over_tp) continue;
    ++over;
    EXPECT_GT(e.layout.tp, 1);
    EXPECT_EQ(e.layout.ep, 1);
    EXPECT_EQ(e.layout.str(), "tp=" + std::to_string(e.layout.tp) + " pp=" +
                                  std::to_string(e.layout.pp) + " dp=" +
                                  std::to_string(e.layout.dp) + " ep=tp");
  }
  EXPECT_EQ(over, 3);  // tp 2 with dp 2 or pp 2, and tp 4
  ASSERT_NE(find(r, {2, 1, 2, 1, true}), nullptr);
  ASSERT_NE(find(r, {4, 1, 1, 1, true}), nullptr);
  // The table labels it, the JSON says so.
  const std::string report = render_report(request_for(moe, 4, 4), r, 20);
  EXPECT_NE(report.find("   tp   yes"), std::string::npos) << report;
  EXPECT_NE(report.find("(ep tp: --enable-expert-parallel"), std::string::npos) << report;
  int in_json = 0;
  const nlohmann::json j = to_json(request_for(moe, 4, 4), r);
  for (const auto& l : j["layouts"]) in_json += l["experts_over_tp"].get<bool>() ? 1 : 0;
  EXPECT_EQ(in_json, 3);
  // Not for a dense model, nor for training.
  ModelConfig dense = moe;
  dense.model_type = "llama";
  dense.num_local_experts = 0;
  dense.num_experts_per_tok = 0;
  for (const LayoutEstimate& e : search(request_for(dense, 4, 4)).ranked)
    EXPECT_FALSE(e.layout.experts_over_tp) << e.layout.str();
  PlanRequest train = request_for(moe, 2, 4);
  train.training = true;
  train.train.global_batch = 8;
  train.train.seq_len = 16;
  train.train.precision = Precision::FP32;
  for (const LayoutEstimate& e : search(train).ranked)
    EXPECT_FALSE(e.layout.experts_over_tp) << e.layout.str();
  // Asked for alone: a dense model or training is refused in one line.
  PlanRequest only = request_for(dense, 2, 1);
  only.only_experts_over_tp = true;
  EXPECT_EQ(testing::error_of([&] { search(only); }),
            "[plan] --enable-expert-parallel needs a mixture-of-experts model (test is dense)");
  train.only_experts_over_tp = true;
  EXPECT_EQ(testing::error_of([&] { search(train); }),
            "[plan] --enable-expert-parallel is an inference layout: not with --train");
  // The engine's rules: TP above the experts, or beside --ep, cannot run.
  ModelConfig two = moe;
  two.num_local_experts = 2;
  two.num_experts_per_tok = 1;
  EXPECT_EQ(layout_problem(two, {4, 1, 1, 1, true}),
            "--enable-expert-parallel at --tp 4 exceeds the model's 2 experts (each TP rank holds "
            "at least one whole expert)");
  EXPECT_EQ(layout_problem(moe, {2, 1, 2, 2, true}),
            "--enable-expert-parallel places the experts over the --tp ranks; it does not take "
            "--ep 2 as well");
  EXPECT_EQ(layout_problem(dense, {2, 1, 1, 1, true}),
            "--enable-expert-parallel needs a mixture-of-experts model (this one is dense)");
  for (const LayoutEstimate& e : search(request_for(two, 4, 4)).ranked)
    EXPECT_FALSE(e.layout.experts_over_tp && e.layout.tp > 2) << e.layout.str();
}

TEST(PlanMoe, ExpertsOverTpWeightsAndCommAreTheEngines) {
  // Per-rank weights: rank_weight_bytes with experts_over_tp (what each rank loads: PlanMoe.
  // EnableExpertParallelWeightsAndAllReduceBytesAreTheEngines), the fullest rank in the estimate.
  // Communication per decode token: a sparse layer's MLP all-reduce becomes the MoE all-reduce of
  // moe_all_reduce_step_bytes; everything else is plain TP's.
  const ModelConfig c = tiny_mixtral();
  for (int tp : {2, 4}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    const PlanRequest req = request_for(c, tp, 2);
    InferenceWorkload w = req.inference;
    w.weights = w.kv_cache = w.activations = Precision::FP32;
    const Layout over{tp, 1, 1, 1, true}, plain{tp, 1, 1, 1};
    const LayoutEstimate e = estimate_inference(c, req.cluster, over, w, {});
    const LayoutEstimate p = estimate_inference(c, req.cluster, plain, w, {});
    double most = 0;
    for (int r = 0; r < tp; ++r) {
      const double mine = rank_weight_bytes(c, {tp, 1, 1, 1}, Precision::FP32, 0, r, 0, true);
      EXPECT_EQ(rank_weight_bytes(c, over, Precision::FP32, 0, r), mine);
      most = std::max(most, mine);
    }
    EXPECT_EQ(e.memory.weights, most);
    const int64_t n = 2;  // one decode step of the batch
    const int64_t L = c.num_hidden_layers;
    const MoeAllReduceBytes mb = moe_all_reduce_step_bytes(c, tp, n);
    const LinkSpec& link = req.cluster.group_link(tp == 2 ? std::vector<int>{0, 1}
                                                          : std::vector<int>{0, 1, 2, 3});
    const CommCost ar =
        collective_cost(Collective::AllReduce, double(n * c.hidden_size * 4), tp, link);
    EXPECT_DOUBLE_EQ(e.comm_bytes_per_token - p.comm_bytes_per_token,
                     double(L) * (mb.sent - ar.bytes_sent) / double(n));
    bool seen = false;
    for (const CostTerm& t : e.decode_terms) {
      if (t.name == "tp all-reduce") {
        EXPECT_EQ(t.count, 2 * L - L);
      }
      if (t.name != "ep=tp all-reduce") continue;
      seen = true;
      EXPECT_EQ(t.count, L);
      EXPECT_EQ(t.bytes, mb.payload);
      EXPECT_EQ(t.bytes, double(n * c.num_experts_per_tok * c.hidden_size * 4));
    }
    EXPECT_TRUE(seen);
  }
}

TEST(PlanMoe, ExpertsOverTpBeatsEp2ForMixtralOnTwoDevices) {
  // Mixtral 8x7B, 2 devices, memory-bound decode (batch 2, so --ep 2's two replicas each have a
  // sequence): experts over TP streams half the attention per device where --ep 2 streams all of
  // it (measured on CPU: 0.93x of one rank against 0.78x for --ep 2).
  PlanRequest req = request_for(resolve_model("mixtral-8x7b"), 2, 2);
  req.inference.prompt_len = 512;
  req.inference.output_len = 128;
  const PlanResult r = search(req);
  size_t over = r.ranked.size(), ep2 = r.ranked.size();
  for (size_t i = 0; i < r.ranked.size(); ++i) {
    if (r.ranked[i].layout == Layout{2, 1, 1, 1, true}) over = i;
    if (r.ranked[i].layout == Layout{1, 1, 2, 2}) ep2 = i;
  }
  ASSERT_LT(over, r.ranked.size());
  ASSERT_LT(ep2, r.ranked.size());
  EXPECT_TRUE(r.ranked[over].feasible());
  EXPECT_TRUE(r.ranked[ep2].feasible());
  EXPECT_TRUE(r.ranked[over].decode_memory_bound);
  EXPECT_LT(over, ep2);
  EXPECT_LT(r.ranked[over].tpot, r.ranked[ep2].tpot);
  // Recommended (asked for alone): the command to run it.
  req.only_experts_over_tp = true;
  const PlanResult only = search(req);
  ASSERT_FALSE(only.ranked.empty());
  EXPECT_EQ(only.ranked[0].layout, (Layout{2, 1, 1, 1, true}));
  const std::string report = render_report(req, only, 5);
  EXPECT_NE(report.find("best: tp=2 pp=1 dp=1 ep=tp"), std::string::npos) << report;
  EXPECT_NE(report.find("run: parallm serve --model MODEL --tp 2 --enable-expert-parallel"),
            std::string::npos)
      << report;
  EXPECT_EQ(to_json(req, only)["layouts"][0]["engine_flags"], "--tp 2 --enable-expert-parallel");
}

TEST(PlanMoe, EngineFlagsOfALayout) {
  EXPECT_EQ((Layout{2, 1, 1, 1, true}).engine_flags(), "--tp 2 --enable-expert-parallel");
  EXPECT_EQ((Layout{2, 2, 1, 1, true}).engine_flags(), "--tp 2 --pp 2 --enable-expert-parallel");
  EXPECT_EQ((Layout{2, 1, 2, 1, true}).engine_flags(), "--tp 2 --enable-expert-parallel --dp 2");
  EXPECT_EQ((Layout{1, 1, 2, 2}).engine_flags(), "--ep 2");
  EXPECT_EQ((Layout{1, 1, 4, 2}).engine_flags(), "");  // --ep takes no replicas beside it
  EXPECT_EQ((Layout{4, 1, 1, 1}).engine_flags(), "--tp 4");
  EXPECT_EQ((Layout{1, 1, 1, 1}).engine_flags(), "");
}

}  // namespace
}  // namespace parallm::plan
