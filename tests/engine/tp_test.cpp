// Tensor parallelism is shown by equality: every TP size the model allows gives the same greedy
// tokens as one rank and logits within 1e-5 (f32), and stories260K's tokens equal llama2.c's at
// every TP size; each decode step costs exactly two all-reduces per layer plus the embedding's, and
// one step-plan broadcast.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/comm/stats.h"
#include "parallm/engine/generate.h"
#include "parallm/model/weights.h"
#include "stories_reference.h"
#include "test_util.h"

namespace parallm {
namespace {

struct TpRun {
  GenerateResult result;                                       // rank 0's
  std::vector<uint64_t> all_reduces, all_gathers, broadcasts;  // per rank, the whole generation
  std::vector<uint64_t> weight_bytes;                          // per rank
};

TpRun run_tp(const std::string& path, int tp, const std::vector<int32_t>& prompt, int64_t steps,
             bool collect_logits, SamplingParams sampling = {}) {
  ModelConfig config;
  auto source = open_model(path, &config);
  TpRun out;
  out.all_reduces.resize(tp);
  out.all_gathers.resize(tp);
  out.broadcasts.resize(tp);
  out.weight_bytes.resize(tp);
  std::mutex mu;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(tp, lo, [&](comm::Group world) {
    comm::Mesh mesh(world, {tp, 1, 1, 1});
    LlamaOptions mo;
    mo.weight_dtype = DType::F32;
    LlamaModel model(config, *source, mesh.tp(), mo);
    GenerateOptions go;
    go.max_tokens = steps;
    go.ignore_eos = true;
    go.collect_logits = collect_logits;
    go.sampling = sampling;
    mesh.tp().stats().reset();
    GenerateResult r = generate(model, mesh.tp(), prompt, go);
    std::lock_guard<std::mutex> lock(mu);
    const int rank = world.rank();
    out.all_reduces[rank] = mesh.tp().stats().count(comm::Kind::AllReduce);
    out.all_gathers[rank] = mesh.tp().stats().count(comm::Kind::AllGather);
    out.broadcasts[rank] = mesh.tp().stats().count(comm::Kind::Broadcast);
    out.weight_bytes[rank] = model.weight_bytes();
    if (rank == 0) out.result = std::move(r);
  });
  return out;
}

// Every size in `sizes` against one rank; and, when `reference` is given, every size and one rank
// against it.
void expect_same_as_one_rank(const std::string& path, const std::vector<int>& sizes,
                             const std::vector<int32_t>& prompt, int64_t steps,
                             const std::vector<int32_t>& reference = {}) {
  TpRun one = run_tp(path, 1, prompt, steps, true);
  if (!reference.empty()) {
    EXPECT_EQ(one.result.tokens, reference) << "tp 1";
  }
  for (int tp : sizes) {
    TpRun r = run_tp(path, tp, prompt, steps, true);
    EXPECT_EQ(r.result.tokens, one.result.tokens) << "tp " << tp;
    if (!reference.empty()) {
      EXPECT_EQ(r.result.tokens, reference) << "tp " << tp;
    }
    ASSERT_EQ(r.result.logits.size(), one.result.logits.size());
    double worst = 0;
    for (size_t s = 0; s < r.result.logits.size(); ++s)
      worst = std::max(worst, testing::normalised_error(r.result.logits[s], one.result.logits[s]));
    EXPECT_LT(worst, 1e-5) << "tp " << tp;
  }
}

class TinyModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    auto r = testing::run_parallm("init-model --shape tiny --seed 5 --dtype f32 --out " +
                                  dir_->file("m"));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string path() { return dir_->file("m"); }
  static testing::TempDir* dir_;
};
testing::TempDir* TinyModel::dir_ = nullptr;

TEST_F(TinyModel, EveryTpSizeMatchesOneRank) {
  // tiny: 12 query heads, 6 KV heads, FFN 200 and vocab 250 (uneven at 3), so 2, 3, 6 and 12
  // (KV heads replicated) all fit.
  expect_same_as_one_rank(path(), {2, 3, 6, 12}, {1, 5, 9, 200, 17}, 10);
}

TEST_F(TinyModel, TwoAllReducesPerLayerPerStep) {
  const int64_t steps = 6, layers = 3;
  TpRun r = run_tp(path(), 3, {1, 2, 3}, steps, false);
  for (int rank = 0; rank < 3; ++rank) {
    // Per step (the prefill is one): 2 per layer + 1 for the vocab-parallel embedding; the greedy
    // sampler exchanges candidates with one all-gather, not an all-reduce. The step plan is one
    // broadcast per step, plus the closing step's (whose plan only says "exit").
    EXPECT_EQ(r.all_reduces[rank], static_cast<uint64_t>(steps * (2 * layers + 1))) << rank;
    EXPECT_EQ(r.all_gathers[rank], static_cast<uint64_t>(steps)) << rank;
    EXPECT_EQ(r.broadcasts[rank], static_cast<uint64_t>(steps + 1)) << rank;
  }
}

TEST_F(TinyModel, ShardsHoldAboutOneNthOfTheWeights) {
  TpRun one = run_tp(path(), 1, {1}, 1, false);
  TpRun three = run_tp(path(), 3, {1}, 1, false);
  for (int rank = 0; rank < 3; ++rank) {
    // Norms are replicated (small); everything else splits.
    EXPECT_LT(three.weight_bytes[rank], one.weight_bytes[0] / 3 * 1.05) << rank;
    EXPECT_GT(three.weight_bytes[rank], one.weight_bytes[0] / 3 * 0.95) << rank;
  }
}

TEST_F(TinyModel, SampledTokensAgreeAcrossTpSizes) {
  // The vocab-split sampler draws the same tokens as one rank for the same seed.
  for (SamplingParams sp : {SamplingParams{0.8f, 0, 1.0f, 3}, SamplingParams{1.0f, 5, 1.0f, 3},
                            SamplingParams{1.0f, 0, 0.9f, 3}}) {
    TpRun one = run_tp(path(), 1, {1, 2}, 12, false, sp);
    TpRun two = run_tp(path(), 2, {1, 2}, 12, false, sp);
    TpRun three = run_tp(path(), 3, {1, 2}, 12, false, sp);
    EXPECT_EQ(two.result.tokens, one.result.tokens)
        << sp.temperature << " " << sp.top_k << " " << sp.top_p;
    EXPECT_EQ(three.result.tokens, one.result.tokens)
        << sp.temperature << " " << sp.top_k << " " << sp.top_p;
  }
}

TEST(Stories260KTp, Llama2cTokensAtEveryTpSize) {
  // 8 heads, 4 KV heads: TP 2 and 4 split KV heads, TP 8 replicates them; FFN 172 splits unevenly.
  // The tokens are llama2.c's own (an independent implementation), at every size.
  expect_same_as_one_rank(testing::stories_model(), {2, 4, 8}, {1}, 24,
                          testing::stories_llama2c_tokens(24));
}

TEST(Tp, SizeThatDoesNotFitSaysWhichWould) {
  auto r = testing::run_parallm("generate --model " + testing::stories_model() +
                                " --prompt-ids 1 --tp 3");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("sizes that work: 1, 2, 4, 8"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace parallm
