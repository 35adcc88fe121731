// Issue 17 in the generation loop: the finite-activation check names where a non-finite value
// appeared; a stop request ends the loop with the tokens so far on every layout; prompt +
// max_tokens is checked for overflow; the time statistics satisfy busy <= wall on every rank.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <mutex>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/engine/batch_generate.h"
#include "parallm/engine/stage_forward.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/partition.h"
#include "test_util.h"

namespace parallm {
namespace {

std::string stories() { return std::string(PARALLM_SOURCE_DIR) + "/models/stories260K/stories260K.bin"; }

TEST(EngineHardening, CheckFiniteNamesWhereAndStep) {
  std::vector<float> x(3 * 4, 1.0f);
  EXPECT_NO_THROW(check_finite_activations(x.data(), 3, 4, "layer 1", 0));
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
    x[2 * 4 + 1] = bad;
    try {
      check_finite_activations(x.data(), 3, 4, "layer 7", 5);
      ADD_FAILURE() << "no error for " << bad;
    } catch (const std::runtime_error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("step 5"), std::string::npos) << m;
      EXPECT_NE(m.find("layer 7"), std::string::npos) << m;
      EXPECT_NE(m.find("token row 2 of 3"), std::string::npos) << m;
    }
  }
}

struct Outcome {
  std::vector<BatchResult> ranks;  // by world rank
};

// Runs two prompts on tp x pp local ranks; on_token (on every rank that learns a token) may stop.
Outcome run(int tp, int pp, const std::vector<Request>& requests, bool stop_at_first_token) {
  ModelConfig config;
  auto source = open_model(stories(), &config);
  auto stages = pipeline::partition_layers(config.num_hidden_layers, pp, {});
  Outcome out;
  out.ranks.resize(tp * pp);
  std::mutex mu;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  clear_stop();
  comm::launch(tp * pp, lo, [&](comm::Group world) {
    comm::Mesh mesh(world, {tp, pp, 1, 1});
    LlamaOptions mo;
    mo.weight_dtype = DType::F32;
    mo.layer_begin = stages[mesh.pp_rank()].begin;
    mo.layer_end = stages[mesh.pp_rank()].end;
    LlamaModel model(config, *source, mesh.tp(), mo);
    BatchOptions bo;
    bo.ignore_eos = true;
    TokenCallback cb;
    if (stop_at_first_token) cb = [](int, int32_t) { request_stop(); };
    BatchResult r = generate_batch(model, mesh, requests, bo, cb);
    std::lock_guard<std::mutex> lock(mu);
    out.ranks[world.rank()] = std::move(r);
  });
  clear_stop();
  return out;
}

TEST(EngineHardening, StopEndsTheLoopWithTheTokensSoFar) {
  for (auto [tp, pp] : {std::pair{1, 1}, {2, 1}, {1, 2}, {1, 3}}) {
    const std::vector<Request> requests = {{{1, 2, 3}, 200}, {{1, 7}, 200}};
    const Outcome o = run(tp, pp, requests, true);
    const BatchResult& last = o.ranks[(pp - 1) * tp];  // last stage, TP rank 0
    for (const SequenceOutput& seq : last.sequences) {
      EXPECT_GE(seq.tokens.size(), 1u) << tp << "x" << pp;
      EXPECT_LT(seq.tokens.size(), 200u) << tp << "x" << pp;
    }
    EXPECT_FALSE(stop_requested());
  }
}

TEST(EngineHardening, TimeStatisticsAreWithinTheirIntervals) {
  const std::vector<Request> requests = {{{1, 2, 3}, 12}, {{1, 7}, 12}, {{4}, 12}};
  for (int pp : {1, 2, 3}) {
    const Outcome o = run(1, pp, requests, false);
    for (const BatchResult& r : o.ranks) {
      EXPECT_GE(r.busy_ns, 0);
      EXPECT_LE(r.busy_ns, r.wall_ns);
      EXPECT_GE(r.prefill_busy_ns, 0);
      EXPECT_LE(r.prefill_busy_ns, r.prefill_ns);
      EXPECT_LE(r.prefill_ns, r.wall_ns);
      EXPECT_LE(r.prefill_busy_ns, r.busy_ns);
    }
  }
}

TEST(EngineHardening, PromptPlusMaxTokensOverflowIsRefused) {
  const std::vector<Request> requests = {{{1, 2}, std::numeric_limits<int64_t>::max()}};
  const std::string m = testing::error_of([&] { run(1, 1, requests, false); });
  EXPECT_NE(m.find("--max-tokens 9223372036854775807 overflows"), std::string::npos) << m;
}

}  // namespace
}  // namespace parallm
