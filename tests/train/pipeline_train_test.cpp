// Pipeline (and 3D) training end to end on tiny f32 models: every schedule at PP 2, 3 and 4 gives
// PP = 1's losses and parameters, the stages hold exactly the schedule's micro-batches in flight,
// TP x PP (x DP) layouts on any world size follow one rank, SP and recomputation change nothing,
// and bad pipeline flags are refused in one line.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "parallm/core/error.h"
#include "parallm/pipeline/schedule.h"
#include "parallm/pipeline/simulator.h"
#include "parallm/train/trainer.h"
#include "train/train_config.h"

namespace fs = std::filesystem;

namespace parallm::train {
namespace {

// tiny_train_config with 8 layers (interleaved v = 2 at PP 4 needs 8 virtual stages).
ModelConfig deep_config(bool tied) {
  ModelConfig c = testing::tiny_train_config(tied);
  c.num_hidden_layers = 8;
  c.validate("deep_config");
  return c;
}

std::shared_ptr<const TokenData> token_data(int vocab) {
  std::mt19937_64 rng(5);
  std::vector<int32_t> ids(4000);
  // Skewed (some tokens far more likely), so the loss falls.
  for (auto& id : ids) id = static_cast<int32_t>((rng() % vocab) * (rng() % vocab) / vocab);
  return std::make_shared<TokenData>(TokenData::from_ids(std::move(ids), vocab));
}

class PipelineTrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           cat("parallm_pipeline_train_",
               ::testing::UnitTest::GetInstance()->current_test_info()->name(), "_", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write_config(const ModelConfig& c, const std::string& name) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path) << c.to_json().dump(2);
    return path;
  }
  // 12 micro-batches of 2 sequences of 8 tokens per step: a multiple of 2, 3 and 4 (interleaved).
  TrainOptions base(bool tied = false, int64_t steps = 10) {
    TrainOptions o;
    o.init = write_config(deep_config(tied), tied ? "tied.json" : "untied.json");
    o.data_ids = token_data(67);
    o.seq_len = 8;
    o.micro_batch = 2;
    o.global_batch = 24;
    o.steps = steps;
    o.adamw.lr = 1e-2;
    o.adamw.min_lr = 1e-3;
    o.adamw.warmup_steps = 2;
    o.adamw.schedule = "cosine";
    o.adamw.weight_decay = 0.1;
    o.adamw.grad_clip = 0.5;  // below the first steps' norms: the clip is exercised
    o.seed = 3;
    o.threads = 1;
    o.bucket_bytes = 4096;
    o.quiet = true;
    o.backend = "local";
    o.comm_timeout_s = 60;
    o.keep_params = true;
    return o;
  }

  fs::path dir_;
};

std::map<std::string, const std::vector<float>*> by_name(const TrainResult& r) {
  std::map<std::string, const std::vector<float>*> m;
  for (const auto& [name, v] : r.final_params) m[name] = &v;
  return m;
}

// Losses and learning rates equal bit for bit; the gradient norm sums the same squares grouped by
// stage (a different order of double additions, so within 1e-12); every parameter bit for bit.
void expect_bit_for_bit(const TrainResult& ref, const TrainResult& got, const std::string& what) {
  ASSERT_EQ(ref.steps.size(), got.steps.size()) << what;
  for (size_t i = 0; i < ref.steps.size(); ++i) {
    EXPECT_EQ(got.steps[i].loss, ref.steps[i].loss) << what << " step " << i + 1;
    EXPECT_EQ(got.steps[i].lr, ref.steps[i].lr) << what << " step " << i + 1;
    EXPECT_NEAR(got.steps[i].grad_norm, ref.steps[i].grad_norm, 1e-12 * ref.steps[i].grad_norm)
        << what << " step " << i + 1;
  }
  const auto a = by_name(ref), b = by_name(got);
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, v] : a) {
    ASSERT_TRUE(b.count(name)) << what << ": " << name;
    const std::vector<float>& w = *b.at(name);
    ASSERT_EQ(v->size(), w.size()) << what << ": " << name;
    EXPECT_EQ(std::memcmp(v->data(), w.data(), v->size() * sizeof(float)), 0)
        << what << ": " << name << " differs";
  }
}

// Relative difference of two tensors: |a - b| / |a| (Euclidean norms).
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    n += static_cast<double>(a[i]) * a[i];
  }
  return std::sqrt(d / std::max(n, 1e-300));
}

void expect_close(const TrainResult& ref, const TrainResult& got, double tol,
                  const std::string& what, bool params = true) {
  ASSERT_EQ(ref.steps.size(), got.steps.size()) << what;
  for (size_t i = 0; i < ref.steps.size(); ++i)
    EXPECT_NEAR(got.steps[i].loss, ref.steps[i].loss, tol * std::abs(ref.steps[i].loss))
        << what << " step " << i + 1;
  if (!params) return;
  const auto b = by_name(got);
  for (const auto& [name, v] : ref.final_params) {
    ASSERT_TRUE(b.count(name)) << what << ": " << name;
    EXPECT_LE(rel_diff(v, *b.at(name)), tol) << what << ": " << name;
  }
}

struct Case {
  const char* schedule;
  int pp, v;
  std::vector<int64_t> layers;  // per virtual stage; empty: even
};

// Every schedule at PP 2, 3, 4 (and uneven splits): PP = 1's losses and parameters bit for bit
// (untied embeddings: each stage accumulates its gradients over the micro-batches in the same
// order as PP = 1, and the loss is summed on the last stage in micro-batch order). And on every
// stage the micro-batches held at once equal the schedule's count exactly.
TEST_F(PipelineTrainTest, EverySchedulePp234MatchesPp1BitForBit) {
  const TrainResult ref = run_training(base());
  ASSERT_EQ(ref.steps.size(), 10u);
  EXPECT_LT(ref.steps.back().loss, ref.steps.front().loss);
  EXPECT_GT(ref.steps.front().grad_norm, 0.5);  // the clip was active
  const std::vector<Case> cases = {
      {"gpipe", 2, 1, {}},
      {"gpipe", 3, 1, {}},
      {"gpipe", 4, 1, {}},
      {"1f1b", 2, 1, {}},
      {"1f1b", 3, 1, {}},
      {"1f1b", 4, 1, {}},
      {"1f1b", 3, 1, {1, 5, 2}},
      {"interleaved", 2, 2, {}},
      {"interleaved", 3, 2, {}},
      {"interleaved", 4, 2, {}},
      {"interleaved", 2, 2, {3, 1, 1, 3}},
      {"zb-h1", 2, 1, {}},
      {"zb-h1", 3, 1, {}},
      {"zb-h1", 4, 1, {4, 1, 1, 2}},
  };
  for (const Case& c : cases) {
    TrainOptions o = base();
    o.pp = c.pp;
    o.schedule = c.schedule;
    o.virtual_stages = c.v;
    o.pp_layers = c.layers;
    const std::string what = cat(c.schedule, " pp ", c.pp, " v ", c.v, " layers ",
                                 c.layers.empty() ? "even" : join(c.layers, ","));
    const TrainResult got = run_training(o);
    expect_bit_for_bit(ref, got, what);
    ASSERT_EQ(got.stages.size(), static_cast<size_t>(c.pp)) << what;
    const pipeline::Schedule s =
        pipeline::make_schedule(pipeline::parse_schedule_kind(c.schedule), c.pp, 12, c.v);
    const pipeline::SimResult sim = pipeline::simulate(s);
    int64_t layers = 0;
    for (const StageStats& st : got.stages) {
      EXPECT_EQ(st.peak_in_flight_chunks, sim.peak_in_flight_chunks[st.stage])
          << what << " stage " << st.stage;
      EXPECT_EQ(st.schedule_in_flight_chunks, sim.peak_in_flight_chunks[st.stage]);
      if (std::string(c.schedule) == "1f1b") {  // Megatron's count: min(p - r, m)
        EXPECT_EQ(st.peak_in_flight_chunks, std::min(c.pp - st.stage, 12)) << what;
      }
      if (std::string(c.schedule) == "gpipe") {
        EXPECT_EQ(st.peak_in_flight_chunks, 12) << what;
      }
      EXPECT_GT(st.peak_activation_bytes, 0) << what;
      // plan's formula per held state (ZB-H1: shrunk at B to what W needs), walked over the
      // schedule: exactly what the model holds.
      EXPECT_EQ(static_cast<double>(st.peak_activation_bytes), st.formula_activation_bytes)
          << what << " stage " << st.stage;
      EXPECT_GT(st.busy_s, 0) << what;
      EXPECT_GE(st.makespan_s, st.busy_s) << what;
      layers += st.layers;
    }
    EXPECT_EQ(layers, 8) << what;
    EXPECT_GE(got.bubble, 0.0) << what;
    EXPECT_LT(got.bubble, 1.0) << what;
  }
}

// Tied embeddings: the first stage's embedding gradient and the last stage's copy are summed
// across the two stages, a different order of addition than PP = 1's (which adds the head's and
// the embedding's contributions micro-batch by micro-batch): within 1e-6 relative. The two copies
// stay equal bit for bit.
TEST_F(PipelineTrainTest, TiedEmbeddingsSummedAcrossStages) {
  const TrainResult ref = run_training(base(true));
  for (const Case& c :
       std::vector<Case>{{"1f1b", 2, 1, {}}, {"interleaved", 3, 2, {}}, {"zb-h1", 4, 1, {}}}) {
    TrainOptions o = base(true);
    o.pp = c.pp;
    o.schedule = c.schedule;
    o.virtual_stages = c.v;
    const TrainResult got = run_training(o);
    const std::string what = cat("tied ", c.schedule, " pp ", c.pp);
    expect_close(ref, got, 1e-6, what);
    const auto m = by_name(got);
    const std::string emb = "model.embed_tokens.weight";
    ASSERT_TRUE(m.count(emb) && m.count("tied_copy:" + emb)) << what;
    EXPECT_EQ(*m.at(emb), *m.at("tied_copy:" + emb)) << what;
  }
  // With TP 2 and DP 2 under ZeRO-1: the summed embedding gradient's bucket is reduced after the
  // stage sum (its grad-ready hook held back until then); one rank's losses within 1e-5.
  TrainOptions o = base(true);
  o.tp = 2;
  o.pp = 2;
  o.dp = 2;
  o.zero = 1;
  const TrainResult got = run_training(o);
  expect_close(ref, got, 1e-5, "tied tp 2 pp 2 dp 2 zero", false);
  const auto m = by_name(got);
  EXPECT_EQ(*m.at("model.embed_tokens.weight"), *m.at("tied_copy:model.embed_tokens.weight"));
}

// TP x PP on threads, world sizes that are not powers of two, and DP with ZeRO: one rank's
// losses within 1e-5 relative (TP changes the order of the reductions).
TEST_F(PipelineTrainTest, TpPpDpLayoutsMatchOneRank) {
  const TrainResult ref = run_training(base(false, 10));
  struct Layout {
    int tp, pp, dp, zero;
    const char* schedule;
  };
  for (Layout l : {Layout{2, 3, 1, 0, "1f1b"}, Layout{3, 3, 1, 0, "1f1b"},
                   Layout{1, 3, 2, 1, "interleaved"}, Layout{2, 2, 2, 1, "zb-h1"}}) {
    TrainOptions o = base(false, 10);
    o.tp = l.tp;
    o.pp = l.pp;
    o.dp = l.dp;
    o.zero = l.zero;
    o.schedule = l.schedule;
    o.virtual_stages = std::string(l.schedule) == "interleaved" ? 2 : 1;
    // 12 micro-batches per step over DP 2: 6 per DP rank (a multiple of PP 3 for interleaved).
    expect_close(ref, run_training(o), 1e-5,
                 cat("tp ", l.tp, " pp ", l.pp, " dp ", l.dp, " ", l.schedule), false);
  }
}

// Sequence parallelism on and off within 1e-6 (reduce-scatter + all-gather add the TP partial
// sums in another order than the all-reduce); at TP 1 --sp is a no-op (bit for bit).
TEST_F(PipelineTrainTest, SequenceParallelMatches) {
  TrainOptions o = base(false, 4);
  o.tp = 2;
  o.pp = 2;
  const TrainResult off = run_training(o);
  o.sp = true;
  const TrainResult on = run_training(o);
  expect_close(off, on, 1e-6, "sp tp 2 pp 2");
  // TP rank 0's held bytes: the formula's with SP (the norm/residual rows split over TP), and less
  // than without SP.
  for (size_t s = 0; s < on.stages.size(); ++s) {
    EXPECT_EQ(static_cast<double>(on.stages[s].peak_activation_bytes),
              on.stages[s].formula_activation_bytes)
        << "sp stage " << s;
    EXPECT_EQ(static_cast<double>(off.stages[s].peak_activation_bytes),
              off.stages[s].formula_activation_bytes)
        << "no sp stage " << s;
    EXPECT_LT(on.stages[s].peak_activation_bytes, off.stages[s].peak_activation_bytes);
  }
  TrainOptions one = base(false, 2);  // (PP 1's SP path is the slow one: 2 steps)
  one.tp = 2;
  const TrainResult one_off = run_training(one);
  one.sp = true;
  expect_close(one_off, run_training(one), 1e-6, "sp tp 2 pp 1");
  TrainOptions tp1 = base(false, 3);
  tp1.pp = 2;
  const TrainResult a = run_training(tp1);
  tp1.sp = true;
  expect_bit_for_bit(a, run_training(tp1), "sp at tp 1");
}

// Recomputation keeps the results bit for bit (the recomputed forward is the same arithmetic), at
// PP 1 and under a pipeline; it holds fewer activation bytes.
TEST_F(PipelineTrainTest, RecomputeBitForBit) {
  for (int pp : {1, 2}) {
    TrainOptions o = base(false, 3);
    o.pp = pp;
    const TrainResult none = run_training(o);
    for (const char* r : {"selective", "full"}) {
      o.recompute = r;
      const TrainResult got = run_training(o);
      expect_bit_for_bit(none, got, cat("recompute ", r, " pp ", pp));
      for (size_t s = 0; s < got.stages.size(); ++s) {
        EXPECT_LT(got.stages[s].peak_activation_bytes, none.stages[s].peak_activation_bytes)
            << r << " stage " << s;
        EXPECT_EQ(static_cast<double>(got.stages[s].peak_activation_bytes),
                  got.stages[s].formula_activation_bytes)
            << r << " stage " << s;
      }
    }
  }
}

// The validation loss through the pipeline (forwards alone, states discarded): PP = 1's bit for
// bit, interleaved and ZB-H1 too, and the training losses are unchanged by it.
TEST_F(PipelineTrainTest, EvalThroughThePipeline) {
  TrainOptions o = base(false, 4);
  o.val_ids = std::make_shared<TokenData>(TokenData::from_ids(
      [] {
        std::vector<int32_t> v(600);
        for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int32_t>((i * 7 + i / 5) % 67);
        return v;
      }(),
      67));
  o.eval_every = 2;
  o.eval_batches = 2;
  const TrainResult ref = run_training(o);
  for (const Case& c :
       std::vector<Case>{{"1f1b", 3, 1, {}}, {"interleaved", 2, 2, {}}, {"zb-h1", 4, 1, {}}}) {
    TrainOptions p = o;
    p.pp = c.pp;
    p.schedule = c.schedule;
    p.virtual_stages = c.v;
    const TrainResult got = run_training(p);
    expect_bit_for_bit(ref, got, cat("eval ", c.schedule, " pp ", c.pp));
    for (size_t i = 0; i < ref.steps.size(); ++i) {
      EXPECT_EQ(got.steps[i].val_loss >= 0, i % 2 == 1);
      EXPECT_EQ(got.steps[i].val_loss, ref.steps[i].val_loss) << c.schedule << " step " << i + 1;
    }
  }
}

// Checkpoints under PP: interrupted at step 5 at PP 2 (1F1B) and resumed at PP 2, the run
// continues bit for bit; resumed at PP 3 interleaved or at PP 1 (one consolidated checkpoint
// whatever the layout), the same too (untied embeddings: the layouts are bit for bit).
TEST_F(PipelineTrainTest, ResumeUnderPipelineBitForBit) {
  TrainOptions full = base(false, 8);
  full.pp = 2;
  const TrainResult a = run_training(full);
  TrainOptions half = full;
  half.save = (dir_ / "half").string();
  half.stop_after = 4;
  run_training(half);
  for (auto [pp, schedule, v] :
       {std::tuple{2, "1f1b", 1}, std::tuple{3, "interleaved", 2}, std::tuple{1, "1f1b", 1}}) {
    TrainOptions rest = full;
    rest.init.clear();
    rest.resume = half.save;
    rest.pp = pp;
    rest.schedule = schedule;
    rest.virtual_stages = v;
    const TrainResult c = run_training(rest);
    ASSERT_EQ(c.steps.size(), 4u);
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(c.steps[i].loss, a.steps[4 + i].loss) << "pp " << pp << " step " << 5 + i;
      EXPECT_EQ(c.steps[i].lr, a.steps[4 + i].lr);
    }
    const auto x = by_name(a), y = by_name(c);
    for (const auto& [name, val] : x) EXPECT_EQ(*val, *y.at(name)) << "pp " << pp << ": " << name;
  }
}

// The reshard case end to end: a checkpoint written at TP 2 x PP 2 x DP 2 (ZeRO-1) loads
// at TP 1 x PP 4 x DP 2, TP 4 x PP 1 x DP 1 and 1 x 1 x 1, and training continues as one rank's
// uninterrupted run does (within 1e-5 relative: the layouts sum TP partials and DP replicas in
// other orders; the values and moments themselves load bit for bit, checkpoint_reshard_test.cpp).
TEST_F(PipelineTrainTest, ReshardedCheckpointContinuesAtOtherLayouts) {
  const TrainResult one = run_training(base(false, 6));
  TrainOptions first = base(false, 6);
  first.tp = 2, first.pp = 2, first.dp = 2, first.zero = 1;
  first.save = (dir_ / "ckpt").string();
  first.stop_after = 3;
  const TrainResult a = run_training(first);
  ASSERT_EQ(a.steps.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(a.steps[i].loss, one.steps[i].loss, 1e-5 * one.steps[i].loss) << "step " << i + 1;
  for (auto [tp, pp, dp] : {std::tuple{1, 4, 2}, std::tuple{4, 1, 1}, std::tuple{1, 1, 1}}) {
    TrainOptions rest = base(false, 6);
    rest.init.clear();
    rest.resume = first.save;
    rest.tp = tp, rest.pp = pp, rest.dp = dp;
    const TrainResult c = run_training(rest);
    const std::string what = cat("TP ", tp, " x PP ", pp, " x DP ", dp);
    ASSERT_EQ(c.steps.size(), 3u) << what;
    for (size_t i = 0; i < 3; ++i)
      EXPECT_NEAR(c.steps[i].loss, one.steps[3 + i].loss, 1e-5 * one.steps[3 + i].loss)
          << what << " step " << 4 + i;
    // The parameters, as a further check at 1e-4: AdamW divides each update by sqrt(v), so an
    // element whose gradient is near zero turns a last-bit difference of the summation order
    // into a larger step difference (measured: up to 2.3e-5 relative per tensor after 6 steps).
    const auto b = by_name(c);
    for (const auto& [name, v] : one.final_params) {
      ASSERT_TRUE(b.count(name)) << what << ": " << name;
      EXPECT_LE(rel_diff(v, *b.at(name)), 1e-4) << what << ": " << name;
    }
  }
}

// --trace: one Chrome trace with every rank's F, B, sends and receives.
TEST_F(PipelineTrainTest, TraceHasEveryStagesActions) {
  TrainOptions o = base(false, 2);
  o.pp = 2;
  o.trace = (dir_ / "trace.json").string();
  run_training(o);
  std::ifstream in(o.trace);
  ASSERT_TRUE(in.good());
  const nlohmann::json j = nlohmann::json::parse(in);
  const nlohmann::json& events = j.is_array() ? j : j.at("traceEvents");
  std::map<int, std::set<char>> kinds;  // pid -> first letters of the action names
  std::map<int, int> sends, recvs;
  for (const auto& e : events) {
    if (e.value("ph", "") != "X") continue;
    const std::string name = e.value("name", "");
    const int pid = e.value("pid", -1);
    if (name.rfind("send", 0) == 0) ++sends[pid];
    if (name.rfind("recv", 0) == 0) ++recvs[pid];
    if (!name.empty()) kinds[pid].insert(name[0]);
  }
  for (int rank : {0, 1}) {
    EXPECT_TRUE(kinds[rank].count('F')) << rank;
    EXPECT_TRUE(kinds[rank].count('B') || kinds[rank].count('b')) << rank;
    EXPECT_EQ(sends[rank], 2 * 12) << rank;  // 12 micro-batches x 2 steps, one send each
    EXPECT_EQ(recvs[rank], 2 * 12) << rank;
  }
}

// --trace under DP: each rank's step (F+B, the optimizer) on its own row and the DP gradient
// buckets' reductions on the communication thread's ("dp comm", tid 1), every bucket every step;
// --comm-stats prints the table with the DP group's all-reduces.
TEST_F(PipelineTrainTest, TraceAndCommStatsShowTheDpBuckets) {
  TrainOptions o = base(false, 2);
  o.dp = 2;
  o.trace = (dir_ / "dp-trace.json").string();
  o.comm_stats = true;
  std::ostringstream progress;
  run_training(o, &progress);
  EXPECT_NE(progress.str().find("dp       all_reduce"), std::string::npos) << progress.str();
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(o.trace));
  std::map<int, int> buckets, steps, optimizer;
  std::map<int, std::string> thread_name;
  for (const auto& e : j.at("traceEvents")) {
    const std::string name = e.value("name", "");
    const int pid = e.value("pid", -1), tid = e.value("tid", 0);
    if (e.value("ph", "") == "M" && name == "thread_name" && tid == 1)
      thread_name[pid] = e["args"].value("name", "");
    if (e.value("ph", "") != "X") continue;
    if (name.rfind("dp bucket ", 0) == 0 && tid == 1) ++buckets[pid];
    if (name.rfind("F+B ", 0) == 0 && tid == 0) ++steps[pid];
    if (name == "optimizer" && tid == 0) ++optimizer[pid];
  }
  // 24 sequences a step over DP 2: 6 micro-batches of 2 per rank.
  for (int rank : {0, 1}) {
    EXPECT_EQ(thread_name[rank], "dp comm") << rank;
    EXPECT_EQ(steps[rank], 2 * 6) << rank;
    EXPECT_EQ(optimizer[rank], 2) << rank;
    // 4 KB buckets: several a step, the same each of the 2 steps.
    EXPECT_GT(buckets[rank], 2 * 2) << rank;
    EXPECT_EQ(buckets[rank] % 2, 0) << rank;
  }
}

// The CLI: --pp with --stats prints the per-stage table; a bad --pp-layers is one line.
TEST_F(PipelineTrainTest, CliStatsAndBadFlag) {
  const std::string d = dir_.string();
  ModelConfig c = deep_config(false);
  const std::string cfg = write_config(c, "cli.json");
  {
    std::ofstream out(dir_ / "data.bin", std::ios::binary);
    for (int i = 0; i < 2000; ++i) {
      const uint16_t id = static_cast<uint16_t>((i * 7 + i / 3) % 67);
      out.write(reinterpret_cast<const char*>(&id), 2);
    }
  }
  const std::string base_cmd =
      cat(PARALLM_BIN, " train --init ", cfg, " --data ", d, "/data.bin --seq-len 8 ",
          "--micro-batch-size 2 --global-batch-size 8 --steps 2 --threads 1 --quiet");
  ASSERT_EQ(
      std::system(cat(base_cmd, " --pp 2 --schedule zb-h1 --stats 2> ", d, "/stats.txt").c_str()),
      0);
  std::ifstream in(dir_ / "stats.txt");
  std::stringstream text;
  text << in.rdbuf();
  const std::string t = text.str();
  EXPECT_NE(t.find("[stats] zb-h1 p=2 m=4"), std::string::npos) << t;
  EXPECT_NE(t.find("[stats] bubble: measured"), std::string::npos) << t;
  EXPECT_NE(t.find("replay of the mean measured F/B/W at p stages"), std::string::npos) << t;
  EXPECT_NE(std::system(cat(base_cmd, " --pp 2 --pp-layers 4,x 2> ", d, "/err.txt").c_str()), 0);
  std::ifstream err(dir_ / "err.txt");
  std::stringstream e;
  e << err.rdbuf();
  const std::string msg = e.str();
  EXPECT_NE(msg.find("--pp-layers"), std::string::npos) << msg;
  EXPECT_EQ(std::count(msg.begin(), msg.end(), '\n'), 1) << msg;
}

// Bad pipeline flags: one line naming the flag and the value, before any rank starts.
TEST_F(PipelineTrainTest, BadPipelineFlagsOneLine) {
  auto refused = [&](TrainOptions o, const std::string& needle) {
    try {
      run_training(o);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  };
  TrainOptions o = base(false, 1);
  o.pp = 2;
  o.schedule = "pipedream";
  refused(o, "pipedream");
  o.schedule = "1f1b";
  o.virtual_stages = 2;
  refused(o, "--virtual-stages 2");
  o.schedule = "interleaved";
  o.pp = 5;  // 12 micro-batches are not a multiple of 5
  refused(o, "--pp 5");
  o.pp = 4;
  o.virtual_stages = 3;  // 12 virtual stages over 8 layers
  refused(o, "8 layers");
  o.virtual_stages = 2;
  o.pp_layers = {1, 1, 1, 1, 1, 1, 2};
  refused(o, "--pp-layers 1,1,1,1,1,1,2");
  o.pp_layers = {1, 1, 1, 1, 1, 1, 1, 2};
  refused(o, "--pp-layers");  // sums to 9
  TrainOptions r = base(false, 1);
  r.recompute = "some";
  refused(r, "some");
  TrainOptions i = base(false, 1);
  i.schedule = "interleaved";
  refused(i, "--pp");
}

}  // namespace
}  // namespace parallm::train
