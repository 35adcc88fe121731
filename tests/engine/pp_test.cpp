// Pipeline parallelism (and TP x PP) is shown by equality with one rank: same greedy tokens and
// logits within 1e-5 (f32), for every stage count and uneven splits, with one and several prompts;
// the first rank (which learns the tokens from the last stage) holds the same tokens as the last
// stage; a batch gives each prompt the tokens it gets alone; a finished sequence leaves the batch;
// prompts fed in chunks give the same tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/engine/batch_generate.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/partition.h"
#include "stories_reference.h"
#include "test_util.h"

namespace parallm {
namespace {

using Prompts = std::vector<std::vector<int32_t>>;

struct PipelineRun {
  int tp = 1, pp = 1;
  int micro_batches = 0;
  std::vector<int64_t> layers;  // --pp-layers; empty: even
  SamplingParams sampling;
  int64_t prefill_chunk = 0;
  bool ignore_eos = true;
  std::vector<int64_t> eos;  // replaces the model's eos ids when not empty
  bool split = false;        // --pp-split on: activations cross in 1/TP blocks, all-gathered
};

// What every rank saw of each sequence's forward work: [world rank][sequence] -> (steps, fed).
using Work = std::vector<std::vector<std::pair<int64_t, int64_t>>>;

// Runs the requests on tp x pp ranks (local backend) and returns the last stage's first TP rank's
// result (it holds tokens and logits). The first rank learns every token from the last stage's
// results: its tokens must be the same ones. `work`, if given, gets every rank's step counts.
BatchResult run_requests(const std::string& path, const PipelineRun& run,
                         const std::vector<Request>& requests, int64_t steps,
                         Work* work = nullptr) {
  ModelConfig config;
  auto source = open_model(path, &config);
  if (!run.eos.empty()) config.eos_token_ids = run.eos;
  auto stages = pipeline::partition_layers(config.num_hidden_layers, run.pp, run.layers);
  BatchResult out, first;
  std::mutex mu;
  if (work) work->assign(run.tp * run.pp, {});
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(run.tp * run.pp, lo, [&](comm::Group world) {
    comm::Mesh mesh(world, {run.tp, run.pp, 1, 1});
    LlamaOptions mo;
    mo.weight_dtype = DType::F32;
    mo.layer_begin = stages[mesh.pp_rank()].begin;
    mo.layer_end = stages[mesh.pp_rank()].end;
    LlamaModel model(config, *source, mesh.tp(), mo);
    BatchOptions bo;
    bo.max_tokens = steps;
    bo.ignore_eos = run.ignore_eos;
    bo.collect_logits = true;
    bo.micro_batches = run.micro_batches;
    bo.sampling = run.sampling;
    bo.prefill_chunk = run.prefill_chunk;
    bo.split_pp_hops = run.split;
    BatchResult r = generate_batch(model, mesh, requests, bo);
    std::lock_guard<std::mutex> lock(mu);
    if (work)
      for (const SequenceOutput& seq : r.sequences)
        (*work)[world.rank()].push_back({seq.steps, seq.tokens_fed});
    if (world.rank() == 0) first = r;
    if (mesh.last_stage() && mesh.tp_rank() == 0) out = std::move(r);
  });
  EXPECT_EQ(first.sequences.size(), out.sequences.size());
  for (size_t i = 0; i < out.sequences.size() && i < first.sequences.size(); ++i) {
    EXPECT_EQ(first.sequences[i].tokens, out.sequences[i].tokens)
        << "sequence " << i << ": the first rank's tokens differ from the last stage's";
    EXPECT_EQ(first.sequences[i].stopped_at_eos, out.sequences[i].stopped_at_eos) << i;
  }
  return out;
}

BatchResult run_pipeline(const std::string& path, int tp, int pp, const Prompts& prompts,
                         int64_t steps, int micro_batches, std::vector<int64_t> layers = {},
                         SamplingParams sampling = {}, bool split = false) {
  std::vector<Request> requests;
  for (const auto& p : prompts) requests.push_back({p, steps});
  PipelineRun run;
  run.split = split;
  run.tp = tp;
  run.pp = pp;
  run.micro_batches = micro_batches;
  run.layers = std::move(layers);
  run.sampling = sampling;
  return run_requests(path, run, requests, steps);
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
  EXPECT_EQ(one.sequences[0].tokens, testing::stories_llama2c_tokens(20));
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
    // --pp-split on: each TP rank sends its 1/TP block, the next stage all-gathers.
    expect_equal(run_pipeline(dir.file("m"), tp, pp, kSeveralTiny, 8, 0, {}, {}, true), one,
                 what + " split");
  }
}

TEST(TinyTpPp, SampledBatchMatchesOneRank) {
  testing::TempDir dir;
  auto r =
      testing::run_parallm("init-model --shape tiny --seed 4 --dtype f32 --out " + dir.file("m"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const SamplingParams sp{0.9f, 20, 0.95f, 17};
  BatchResult one = run_pipeline(dir.file("m"), 1, 1, kSeveralTiny, 8, 1, {}, sp);
  for (bool split : {false, true}) {
    BatchResult grid = run_pipeline(dir.file("m"), 2, 3, kSeveralTiny, 8, 2, {}, sp, split);
    for (size_t i = 0; i < kSeveralTiny.size(); ++i)
      EXPECT_EQ(grid.sequences[i].tokens, one.sequences[i].tokens) << i << " split " << split;
  }
}

// Layouts that the finishing and chunking tests run, on the threads backend: TP alone, PP alone
// (each sequence its own micro-batch, and both in one), and TP x PP.
const std::vector<PipelineRun> kLayouts = [] {
  std::vector<PipelineRun> v;
  for (auto [tp, pp, mb] : std::vector<std::tuple<int, int, int>>{
           {1, 1, 1}, {2, 1, 1}, {4, 1, 1}, {1, 2, 2}, {1, 3, 1}, {2, 2, 2}}) {
    PipelineRun r;
    r.tp = tp;
    r.pp = pp;
    r.micro_batches = mb;
    v.push_back(r);
  }
  return v;
}();

std::string name(const PipelineRun& r) {
  return "tp " + std::to_string(r.tp) + " pp " + std::to_string(r.pp) + " micro-batches " +
         std::to_string(r.micro_batches);
}

TEST(GenerationLoop, ShortRequestLeavesTheBatchAtItsMaxTokens) {
  const std::string m = testing::stories_model();
  const std::vector<Request> batch = {{{1, 400, 401}, 3}, {{1, 2, 3, 4, 5, 6}, 12}};
  // Each alone, on one rank.
  const std::vector<int32_t> short_alone = run_requests(m, {}, {batch[0]}, 0).sequences[0].tokens;
  const std::vector<int32_t> long_alone = run_requests(m, {}, {batch[1]}, 0).sequences[0].tokens;
  ASSERT_EQ(short_alone.size(), 3u);
  ASSERT_EQ(long_alone.size(), 12u);
  for (const PipelineRun& layout : kLayouts) {
    Work work;
    BatchResult r = run_requests(m, layout, batch, 0, &work);
    EXPECT_EQ(r.sequences[0].tokens, short_alone) << name(layout);
    EXPECT_EQ(r.sequences[1].tokens, long_alone) << name(layout);
    // The long one sets the number of steps (+ the closing pass that only says "exit").
    EXPECT_EQ(r.steps, 13) << name(layout);
    for (size_t rank = 0; rank < work.size(); ++rank) {
      // The short one's forward work stops after its 3 tokens (a prompt pass and 2 decode
      // steps); the long one feeds its prompt and 11 tokens. Every rank does only that.
      EXPECT_EQ(work[rank][0], std::make_pair(int64_t{3}, int64_t{3 + 2}))
          << name(layout) << " rank " << rank;
      EXPECT_EQ(work[rank][1], std::make_pair(int64_t{12}, int64_t{6 + 11}))
          << name(layout) << " rank " << rank;
    }
  }
}

TEST(GenerationLoop, SequenceThatReachesEosLeavesTheBatch) {
  const std::string m = testing::stories_model();
  // Greedy decoding from BOS gives 461 461 401 ...: with 401 as the end-of-sequence token the
  // first request stops at its third token, the second (which never picks 401 here) runs on.
  const std::vector<Request> batch = {{{1}, 16}, {{1, 300}, 16}};
  PipelineRun alone;
  alone.ignore_eos = false;
  alone.eos = {401};
  const BatchResult a = run_requests(m, alone, {batch[0]}, 0);
  const BatchResult b = run_requests(m, alone, {batch[1]}, 0);
  ASSERT_EQ(a.sequences[0].tokens, (std::vector<int32_t>{461, 461, 401}));
  EXPECT_TRUE(a.sequences[0].stopped_at_eos);
  ASSERT_EQ(b.sequences[0].tokens.size(), 16u) << "the second prompt picked 401: choose another";
  for (PipelineRun layout : kLayouts) {
    layout.ignore_eos = false;
    layout.eos = {401};
    Work work;
    BatchResult r = run_requests(m, layout, batch, 0, &work);
    EXPECT_EQ(r.sequences[0].tokens, a.sequences[0].tokens) << name(layout);
    EXPECT_TRUE(r.sequences[0].stopped_at_eos) << name(layout);
    EXPECT_EQ(r.sequences[1].tokens, b.sequences[0].tokens) << name(layout);
    EXPECT_FALSE(r.sequences[1].stopped_at_eos) << name(layout);
    for (size_t rank = 0; rank < work.size(); ++rank) {
      EXPECT_EQ(work[rank][0].first, 3) << name(layout) << " rank " << rank;
      EXPECT_EQ(work[rank][1].first, 16) << name(layout) << " rank " << rank;
    }
  }
}

TEST(GenerationLoop, PromptsFedInChunksGiveTheSameTokens) {
  const std::string m = testing::stories_model();
  std::vector<Request> batch;
  for (const auto& p : kSeveral) batch.push_back({p, 8});
  const BatchResult whole = run_requests(m, {}, batch, 0);
  for (PipelineRun layout : kLayouts) {
    layout.prefill_chunk = 2;
    Work work;
    expect_equal(run_requests(m, layout, batch, 0, &work), whole,
                 name(layout) + " prefill chunk 2");
    for (size_t rank = 0; rank < work.size(); ++rank)
      for (size_t i = 0; i < batch.size(); ++i) {
        // ceil(len / 2) prompt chunks, then one step per token after the first.
        const int64_t len = static_cast<int64_t>(batch[i].prompt.size());
        EXPECT_EQ(work[rank][i], std::make_pair((len + 1) / 2 + 7, len + 7))
            << name(layout) << " rank " << rank << " sequence " << i;
      }
  }
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
  r = testing::run_parallm("generate --model " + testing::stories_model() +
                           " --prompt-ids 1 --pp 2 --pp-split sideways");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--pp-split: sideways not in {auto,on,off}"), std::string::npos)
      << r.output;
}

// --pp-split auto on the threads backend (one machine): off, so the stages' link carries every
// TP rank's rows; on: each TP rank's half. Tokens the same.
TEST(PipelineCli, PpSplitHalvesWhatTheStagesSend) {
  testing::TempDir dir;
  auto r = testing::run_parallm("init-model --shape small --seed 5 --out " + dir.file("m"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string ids = "1";
  for (int i = 2; i <= 40; ++i) ids += "," + std::to_string(i * 5);
  const std::string base = "generate --model " + dir.file("m") + " --prompt-ids " + ids +
                           " --max-tokens 6 --print-ids --tp 2 --pp 2 --comm-stats --pp-split ";
  auto sent = [](const std::string& out) {  // the pp group's send row: MB sent per instance
    std::istringstream in(out);
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("pp ", 0) == 0 && line.find(" send ") != std::string::npos) {
        std::istringstream f(line);
        std::string group, kind;
        double instances = 0, calls = 0, mb = -1;
        f >> group >> kind >> instances >> calls >> mb;
        return mb;
      }
    return -1.0;
  };
  auto tokens = [](const std::string& out) {  // the "[0] ..." line (stderr's lines come between)
    const size_t at = out.find("[0] ");
    return at == std::string::npos ? std::string() : out.substr(at, out.find('\n', at) - at);
  };
  const auto off = testing::run_parallm(base + "auto");
  const auto on = testing::run_parallm(base + "on");
  ASSERT_EQ(off.exit_code, 0) << off.output;
  ASSERT_EQ(on.exit_code, 0) << on.output;
  EXPECT_FALSE(tokens(off.output).empty()) << off.output;
  EXPECT_EQ(tokens(on.output), tokens(off.output));
  // 45 rows of 256 f32 from each first-stage rank, a mean over the four ranks (the last stage
  // sends only tokens back).
  EXPECT_GT(sent(off.output), 0.02) << off.output;
  EXPECT_LT(sent(on.output), 0.55 * sent(off.output)) << on.output << off.output;
}

}  // namespace
}  // namespace parallm
