// Pipeline parallelism (and TP x PP) is shown by equality with one rank: same greedy tokens and
// logits within 1e-5 (f32), for every stage count and uneven splits, with one and several prompts;
// and a batch gives each prompt the tokens it gets alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/engine/batch_generate.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/partition.h"
#include "test_util.h"

namespace parallm {
namespace {

using Prompts = std::vector<std::vector<int32_t>>;

// Runs the batch on tp x pp ranks (local backend) and returns the last stage's first TP rank's
// result (it holds tokens and logits).
BatchResult run_pipeline(const std::string& path, int tp, int pp, const Prompts& prompts,
                         int64_t steps, int micro_batches, std::vector<int64_t> layers = {},
                         SamplingParams sampling = {}) {
  ModelConfig config;
  auto source = open_model(path, &config);
  auto stages = pipeline::partition_layers(config.num_hidden_layers, pp, layers);
  BatchResult out;
  std::mutex mu;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(tp * pp, lo, [&](comm::Group world) {
    comm::Mesh mesh(world, {tp, pp, 1, 1});
    LlamaOptions mo;
    mo.weight_dtype = DType::F32;
    mo.layer_begin = stages[mesh.pp_rank()].begin;
    mo.layer_end = stages[mesh.pp_rank()].end;
    LlamaModel model(config, *source, mesh.tp(), mo);
    BatchOptions bo;
    bo.max_tokens = steps;
    bo.ignore_eos = true;
    bo.collect_logits = true;
    bo.micro_batches = micro_batches;
    bo.sampling = sampling;
    BatchResult r = generate_batch(model, mesh, prompts, bo);
    if (mesh.first_stage() && mesh.tp_rank() == 0) {
      // The first stage learns every token through the pipeline's feedback: check it agrees.
      std::lock_guard<std::mutex> lock(mu);
      for (size_t i = 0; i < r.sequences.size(); ++i)
        EXPECT_EQ(r.sequences[i].tokens.size(), static_cast<size_t>(steps)) << "sequence " << i;
    }
    if (mesh.last_stage() && mesh.tp_rank() == 0) {
      std::lock_guard<std::mutex> lock(mu);
      out = std::move(r);
    }
  });
  return out;
}

void expect_equal(const BatchResult& got, const BatchResult& want, const std::string& what) {
  ASSERT_EQ(got.sequences.size(), want.sequences.size()) << what;
  for (size_t i = 0; i < want.sequences.size(); ++i) {
    EXPECT_EQ(got.sequences[i].tokens, want.sequences[i].tokens) << what << " sequence " << i;
    ASSERT_EQ(got.sequences[i].logits.size(), want.sequences[i].logits.size()) << what;
    double worst = 0;
    for (size_t s = 0; s < want.sequences[i].logits.size(); ++s)
      worst = std::max(worst, testing::normalised_error(got.sequences[i].logits[s],
                                                        want.sequences[i].logits[s]));
    EXPECT_LT(worst, 1e-5) << what << " sequence " << i;
  }
}

const Prompts kOne = {{1}};
const Prompts kSeveral = {{1}, {1, 400, 401}, {1, 300}, {1, 2, 3, 4, 5, 6}, {7}};
const Prompts kSeveralTiny = {{1}, {1, 200, 201}, {1, 100}, {1, 2, 3, 4, 5, 6}, {7}};

TEST(Stories260KPp, EveryStageCountAndUnevenSplits) {
  const std::string m = testing::stories_model();
  BatchResult one = run_pipeline(m, 1, 1, kOne, 20, 1);
  // The single-rank batch path reproduces llama2.c's reference too (first tokens).
  const std::vector<int32_t> ref = {461, 461, 401, 401, 401, 461, 378, 455, 473, 456};
  EXPECT_EQ(
      std::vector<int32_t>(one.sequences[0].tokens.begin(), one.sequences[0].tokens.begin() + 10),
      ref);
  for (int pp = 2; pp <= 5; ++pp)
    expect_equal(run_pipeline(m, 1, pp, kOne, 20, 0), one, "pp " + std::to_string(pp));
  expect_equal(run_pipeline(m, 1, 3, kOne, 20, 0, {1, 3, 1}), one, "pp 1,3,1");
  expect_equal(run_pipeline(m, 1, 2, kOne, 20, 0, {4, 1}), one, "pp 4,1");
}

TEST(Stories260KPp, BatchOfPromptsAcrossStagesAndMicroBatches) {
  const std::string m = testing::stories_model();
  BatchResult one = run_pipeline(m, 1, 1, kSeveral, 12, 1);
  for (auto [pp, mb] : std::vector<std::pair<int, int>>{{2, 1}, {2, 2}, {3, 5}, {5, 3}})
    expect_equal(run_pipeline(m, 1, pp, kSeveral, 12, mb), one,
                 "pp " + std::to_string(pp) + " micro-batches " + std::to_string(mb));
  // Each prompt gets the tokens it gets alone.
  for (size_t i = 0; i < kSeveral.size(); ++i) {
    BatchResult alone = run_pipeline(m, 1, 1, {kSeveral[i]}, 12, 1);
    EXPECT_EQ(one.sequences[i].tokens, alone.sequences[0].tokens) << "prompt " << i;
  }
}

TEST(TinyTpPp, GridMatchesOneRank) {
  testing::TempDir dir;
  auto r =
      testing::run_parallm("init-model --shape tiny --seed 3 --dtype f32 --out " + dir.file("m"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  BatchResult one = run_pipeline(dir.file("m"), 1, 1, kSeveralTiny, 8, 1);
  BatchResult one_alone = run_pipeline(dir.file("m"), 1, 1, kOne, 8, 1);
  for (auto [tp, pp] : std::vector<std::pair<int, int>>{{2, 2}, {3, 2}, {2, 3}, {1, 3}}) {
    const std::string what = "tp " + std::to_string(tp) + " pp " + std::to_string(pp);
    expect_equal(run_pipeline(dir.file("m"), tp, pp, kSeveralTiny, 8, 0), one, what);
    expect_equal(run_pipeline(dir.file("m"), tp, pp, kOne, 8, 0), one_alone, what + " one prompt");
  }
}

TEST(TinyTpPp, SampledBatchMatchesOneRank) {
  testing::TempDir dir;
  auto r =
      testing::run_parallm("init-model --shape tiny --seed 4 --dtype f32 --out " + dir.file("m"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const SamplingParams sp{0.9f, 20, 0.95f, 17};
  BatchResult one = run_pipeline(dir.file("m"), 1, 1, kSeveralTiny, 8, 1, {}, sp);
  BatchResult grid = run_pipeline(dir.file("m"), 2, 3, kSeveralTiny, 8, 2, {}, sp);
  for (size_t i = 0; i < kSeveralTiny.size(); ++i)
    EXPECT_EQ(grid.sequences[i].tokens, one.sequences[i].tokens) << i;
}

TEST(Partition, EvenSplitGivesLeftoversToTheMiddle) {
  auto counts = [](int64_t layers, int pp, std::vector<int64_t> given = {}) {
    std::vector<int64_t> c;
    for (auto s : pipeline::partition_layers(layers, pp, given)) c.push_back(s.count());
    return c;
  };
  EXPECT_EQ(counts(5, 1), (std::vector<int64_t>{5}));
  EXPECT_EQ(counts(22, 4), (std::vector<int64_t>{5, 6, 6, 5}));
  // 5 over 3: one each, then the two leftovers go to the middle stage and the nearer-first edge.
  EXPECT_EQ(counts(5, 3), (std::vector<int64_t>{2, 2, 1}));
  EXPECT_EQ(counts(7, 4), (std::vector<int64_t>{2, 2, 2, 1}));
  EXPECT_EQ(counts(6, 3, {1, 3, 2}), (std::vector<int64_t>{1, 3, 2}));
  auto ranges = pipeline::partition_layers(6, 3, {1, 3, 2});
  EXPECT_EQ(ranges[1].begin, 1);
  EXPECT_EQ(ranges[2].end, 6);
}

TEST(Partition, BadSplitsNameTheNumbers) {
  auto message = [](auto fn) {
    try {
      fn();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([] {
              pipeline::partition_layers(5, 3, {1, 3, 2});
            }).find("sums to 6 but the model has 5"),
            std::string::npos);
  EXPECT_NE(message([] {
              pipeline::partition_layers(5, 2, {5, 0});
            }).find(">= 1 layer"),
            std::string::npos);
  EXPECT_NE(message([] {
              pipeline::partition_layers(5, 2, {1, 2, 2});
            }).find("3 stages but --pp is 2"),
            std::string::npos);
  EXPECT_NE(message([] { pipeline::partition_layers(5, 6); }).find("more stages than"),
            std::string::npos);
}

TEST(PipelineCli, TraceFileAndBubbleSummary) {
  testing::TempDir dir;
  const std::string prompts = dir.file("prompts.txt");
  {
    std::FILE* f = std::fopen(prompts.c_str(), "w");
    std::fputs("1\n1,400,401\n\n1,300\n", f);
    std::fclose(f);
  }
  auto r = testing::run_parallm(
      "generate --model " + testing::stories_model() + " --prompts-file " + prompts +
      " --max-tokens 6 --print-ids --pp 2 --tp 2 --micro-batches 2 --threads 1 --trace " +
      dir.file("trace.json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("[0] 461 461 401 401 401 461"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("(p-1)/(m+p-1) = 0.333"), std::string::npos) << r.output;
  std::ifstream in(dir.file("trace.json"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto j = nlohmann::json::parse(text);
  std::set<int> pids;
  int layers = 0, reduces = 0, sends = 0;
  for (const auto& e : j["traceEvents"]) {
    pids.insert(e["pid"].get<int>());
    const std::string name = e["name"];
    layers += name.rfind("layer ", 0) == 0;
    reduces += name == "all_reduce";
    sends += name.rfind("sendA", 0) == 0;
  }
  EXPECT_EQ(pids.size(), 4u);  // every rank
  EXPECT_GT(layers, 0);
  EXPECT_GT(reduces, 0);
  EXPECT_GT(sends, 0);
}

TEST(PipelineCli, BadPipelineFlagsFailWithOneLine) {
  auto r = testing::run_parallm("generate --model " + testing::stories_model() +
                                " --prompt-ids 1 --pp 2 --pp-layers 1,1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--pp-layers 1,1 sums to 2 but the model has 5 layers"),
            std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace parallm
