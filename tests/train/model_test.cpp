// TrainModel: gradients against central finite differences on one rank; TP 2, 3, 4 (threads)
// against TP 1 (loss, every gathered gradient); gather_full_tensors and init_params independent of
// the layout; the parameter layout keeps the fused groups contiguous.
#include "parallm/train/model.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/core/thread_pool.h"
#include "parallm/engine/stage_forward.h"
#include "parallm/model/llama.h"
#include "parallm/model/weights.h"
#include "parallm/train/params.h"
#include "test_util.h"
#include "train/train_config.h"

namespace parallm::train {
namespace {

using Full = std::vector<std::pair<std::string, Tensor>>;

using testing::Batch;
using testing::make_batch;

double rel_frobenius(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double d = static_cast<double>(a.data<float>()[i]) - b.data<float>()[i];
    num += d * d;
    den += static_cast<double>(b.data<float>()[i]) * b.data<float>()[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Runs `batches` micro-batches (gradients accumulate) at TP `tp` on threads; returns the losses
// and, from TP rank 0, the gathered values and gradients.
struct RunResult {
  std::vector<double> losses;
  Full values, grads;
  int hook_calls = 0;
  double grad_sq = 0;  // sum of squares of every gradient, each value counted once over TP
};

RunResult run_tp(const ModelConfig& c, int tp, const std::vector<Batch>& batches, uint64_t seed) {
  RunResult out;
  std::mutex mu;
  comm::launch(tp, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
    // TP 1, the reference, runs its kernels on 2 threads, the TP ranks on 1 each.
    ThreadPool pool(tp == 1 ? 2 : 1);
    ScopedPool scope(pool);
    ParamStore params(c, tp, world.rank());
    init_params(params, c, seed);
    TrainModel model(c, params, world);
    int hooks = 0;
    model.set_grad_ready_hook([&](const Param&) { ++hooks; });
    std::vector<double> losses;
    for (const Batch& b : batches)
      losses.push_back(model.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.S, 0.5f));
    // The global gradient norm's sum, with Param::counts_once (replicated K/V included).
    double sq = 0;
    for (const Param& p : params.params())
      if (p.counts_once(world.rank()))
        for (int64_t i = 0; i < p.numel; ++i) sq += double(params.grad(p)[i]) * params.grad(p)[i];
    std::vector<double> sqs(static_cast<size_t>(tp));
    world.all_gather(&sq, sqs.data(), 1, DType::I64);
    // Every rank returns the same loss, bitwise.
    for (double l : losses) {
      std::vector<double> all(static_cast<size_t>(tp));
      world.all_gather(&l, all.data(), 1, DType::I64);
      for (double x : all) EXPECT_EQ(x, l) << "TP " << tp;
    }
    Full values = gather_full_tensors(params, world, false);
    Full grads = gather_full_tensors(params, world, true);
    std::lock_guard<std::mutex> lock(mu);
    if (world.rank() == 0) {
      out.losses = losses;
      out.values = std::move(values);
      out.grads = std::move(grads);
      out.hook_calls = hooks;
      for (double x : sqs) out.grad_sq += x;
    } else {
      EXPECT_TRUE(values.empty());
    }
  });
  return out;
}

void expect_same_tensors(const Full& a, const Full& b, double tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].first, b[i].first) << what;
    ASSERT_EQ(a[i].second.shape(), b[i].second.shape()) << what << " " << a[i].first;
    const double err = rel_frobenius(a[i].second, b[i].second);
    EXPECT_LE(err, tol) << what << ": " << a[i].first;
  }
}

// ---- layout ----

TEST(TrainParams, LayoutKeepsFusedGroupsContiguousAndAligned) {
  const ModelConfig c = testing::tiny_train_config();
  for (int tp : {1, 3}) {
    ParamStore ps(c, tp, tp - 1);
    EXPECT_EQ(ps.params().size(), llama_tensors(c).size());
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const Param& q = ps.find(names::layer(l, "self_attn.q_proj.weight"));
      const Param& k = ps.find(names::layer(l, "self_attn.k_proj.weight"));
      const Param& v = ps.find(names::layer(l, "self_attn.v_proj.weight"));
      const Param& g = ps.find(names::layer(l, "mlp.gate_proj.weight"));
      const Param& u = ps.find(names::layer(l, "mlp.up_proj.weight"));
      EXPECT_EQ(k.offset, q.offset + q.numel);
      EXPECT_EQ(v.offset, k.offset + k.numel);
      EXPECT_EQ(u.offset, g.offset + g.numel);
      EXPECT_EQ(q.offset % 16, 0);
      EXPECT_EQ(g.offset % 16, 0);
    }
    const Param& e = ps.find(names::kEmbed);
    EXPECT_TRUE(e.decay);
    EXPECT_FALSE(e.tp_replicated);
    EXPECT_FALSE(ps.find(names::kNorm).decay);
    EXPECT_TRUE(ps.find(names::kNorm).tp_replicated);
    EXPECT_EQ(ps.size() % 16, 0);
    EXPECT_NE(testing::error_of([&] { ps.find("nope"); }).find("nope"), std::string::npos);
  }
  // K/V replicated over TP when TP exceeds the KV heads.
  const ModelConfig r = testing::tiny_train_config_kv_replicated();
  ParamStore ps(r, 4, 1);
  EXPECT_TRUE(ps.find(names::layer(0, "self_attn.k_proj.weight")).tp_replicated);
  EXPECT_FALSE(ps.find(names::layer(0, "self_attn.q_proj.weight")).tp_replicated);
  EXPECT_NE(testing::error_of([&] { ParamStore(c, 5, 0); }).find("tensor-parallel size 5"),
            std::string::npos);
}

// ---- gradients against finite differences (one rank) ----

void finite_difference_check(const ModelConfig& c) {
  ParamStore params(c, 1, 0);
  init_params(params, c, 7);
  // Larger weights than the init's 0.02 (and norm weights away from 1) so every gradient is well
  // above the loss's f32 rounding.
  std::mt19937 rng(3);
  std::normal_distribution<float> noise(0.0f, 0.1f);
  for (const Param& p : params.params()) {
    float* v = params.value(p);
    for (int64_t i = 0; i < p.numel; ++i) v[i] = p.tensor.matrix ? v[i] * 10.0f : 1.0f + noise(rng);
  }
  TrainModel model(c, params, comm::Group());
  const Batch b = make_batch(c, 2, 5, 11);
  params.zero_grads();
  const double loss = model.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f);
  EXPECT_NEAR(model.loss(b.inputs.data(), b.targets.data(), b.B, b.S), loss, 1e-9 * loss);
  const double eps = 2e-3;
  int checked = 0;
  for (const Param& p : params.params()) {
    std::vector<int64_t> coords;
    if (p.tensor.part == LlamaPart::Embedding) {
      // Rows of ids the batch uses (others have no gradient, unless tied).
      for (int k = 0; k < 3; ++k) coords.push_back(b.inputs[k * 3] * c.hidden_size + 5 * k + 1);
    }
    std::uniform_int_distribution<int64_t> any(0, p.numel - 1);
    for (int k = 0; k < 3; ++k) coords.push_back(any(rng));
    double max_g = 0;
    for (int64_t i : coords) {
      float* v = params.value(p) + i;
      const float keep = *v;
      *v = keep + static_cast<float>(eps);
      const double up = model.loss(b.inputs.data(), b.targets.data(), b.B, b.S);
      *v = keep - static_cast<float>(eps);
      const double down = model.loss(b.inputs.data(), b.targets.data(), b.B, b.S);
      *v = keep;
      const double fd = (up - down) / (2 * eps);
      const double g = params.grad(p)[i];
      max_g = std::max(max_g, std::abs(g));
      EXPECT_NEAR(g, fd, 2e-2 * std::abs(fd) + 2e-3) << p.tensor.name << " [" << i << "]";
      ++checked;
    }
    EXPECT_GT(max_g, 1e-3) << p.tensor.name << ": gradients too small for the check to mean much";
  }
  EXPECT_GT(checked, 0);
}

TEST(TrainModelGrad, FiniteDifferencesUntiedHalfSplit) {
  ModelConfig c = testing::tiny_train_config(false, false);
  c.num_hidden_layers = 1;
  finite_difference_check(c);
}

TEST(TrainModelGrad, FiniteDifferencesTiedInterleavedGqa) {
  ModelConfig c = testing::tiny_train_config_kv_replicated(true, true);
  c.num_hidden_layers = 1;
  finite_difference_check(c);
}

// ---- TP against TP 1 ----

void tp_check(const ModelConfig& c, const std::vector<int>& sizes) {
  const std::vector<Batch> batches = {make_batch(c, 2, 7, 1), make_batch(c, 3, 5, 2)};
  const RunResult ref = run_tp(c, 1, batches, 42);
  ASSERT_EQ(ref.losses.size(), 2u);
  // Every parameter reported ready once per micro-batch.
  EXPECT_EQ(ref.hook_calls, static_cast<int>(2 * ref.grads.size()));
  for (int tp : sizes) {
    const RunResult r = run_tp(c, tp, batches, 42);
    const std::string what = "TP " + std::to_string(tp);
    ASSERT_EQ(r.losses.size(), 2u) << what;
    for (size_t i = 0; i < 2; ++i)
      EXPECT_NEAR(r.losses[i], ref.losses[i], 1e-6 * std::abs(ref.losses[i])) << what;
    EXPECT_EQ(r.hook_calls, ref.hook_calls) << what;
    // init_params is layout-independent: the gathered values are bitwise TP 1's.
    expect_same_tensors(r.values, ref.values, 0.0, what + " values");
    expect_same_tensors(r.grads, ref.grads, 1e-5, what + " grads");
    EXPECT_NEAR(r.grad_sq, ref.grad_sq, 1e-5 * ref.grad_sq) << what;
  }
}

TEST(TrainModelTp, UntiedHalfSplitTp234) {
  tp_check(testing::tiny_train_config(false, false), {2, 3, 4});
}

TEST(TrainModelTp, TiedInterleavedTp234) {
  tp_check(testing::tiny_train_config(true, true), {2, 3, 4});
}

TEST(TrainModelTp, ReplicatedKvHeadsTp4) {
  tp_check(testing::tiny_train_config_kv_replicated(false, false), {2, 4});
}

// ---- gather_full_tensors round trip, loss(), bad ids ----

TEST(TrainModel, GatherRoundTripThroughSafetensors) {
  const ModelConfig c = testing::tiny_train_config(false, false);
  testing::TempDir dir;
  const std::string path = dir / "model.safetensors";
  ParamStore one(c, 1, 0);
  init_params(one, c, 5);
  write_safetensors(path, gather_full_tensors(one, comm::Group()));
  comm::launch(3, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
    ParamStore mine(c, 3, world.rank());
    init_params(mine, c, 5);
    ParamStore loaded(c, 3, world.rank());
    loaded.load(*open_safetensors(path));
    for (const Param& p : mine.params())
      for (int64_t i = 0; i < p.numel; ++i)
        ASSERT_EQ(mine.value(p)[i], loaded.value(p)[i]) << p.tensor.name;
    const Full full = gather_full_tensors(loaded, world);
    if (world.rank() == 0) {
      const Full ref = gather_full_tensors(one, comm::Group());
      expect_same_tensors(full, ref, 0.0, "round trip");
    }
  });
}

TEST(TrainModel, InitParamsStatistics) {
  const ModelConfig c = testing::tiny_train_config();
  ParamStore ps(c, 1, 0);
  init_params(ps, c, 1);
  const Param& e = ps.find(names::kEmbed);
  double s = 0, ss = 0;
  for (int64_t i = 0; i < e.numel; ++i) s += ps.value(e)[i], ss += ps.value(e)[i] * ps.value(e)[i];
  EXPECT_NEAR(s / e.numel, 0.0, 2e-3);
  EXPECT_NEAR(std::sqrt(ss / e.numel), 0.02, 1e-3);
  EXPECT_EQ(ps.value(ps.find(names::kNorm))[3], 1.0f);
  ParamStore other(c, 1, 0);
  init_params(other, c, 2);
  EXPECT_NE(ps.value(e)[0], other.value(other.find(names::kEmbed))[0]);
}

TEST(TrainModel, RejectsIdsOutsideVocabulary) {
  const ModelConfig c = testing::tiny_train_config();
  ParamStore ps(c, 1, 0);
  init_params(ps, c, 1);
  TrainModel m(c, ps, comm::Group());
  std::vector<int32_t> in = {1, 2, 3}, bad = {1, 67, 2};
  EXPECT_NE(testing::error_of([&] {
              m.forward_backward(in.data(), bad.data(), 1, 3, 1.0f);
            }).find("target token id 67"),
            std::string::npos);
  EXPECT_NE(
      testing::error_of([&] { m.loss(bad.data(), in.data(), 1, 3); }).find("input token id 67"),
      std::string::npos);
}

TEST(TrainModel, Bf16ComputeIsCloseToF32) {
  const ModelConfig c = testing::tiny_train_config();
  ParamStore ps(c, 1, 0);
  init_params(ps, c, 1);
  const Batch b = make_batch(c, 2, 6, 4);
  TrainModel f32(c, ps, comm::Group());
  TrainModelOptions bo;
  bo.compute = DType::BF16;
  TrainModel bf16(c, ps, comm::Group(), bo);
  const double a = f32.loss(b.inputs.data(), b.targets.data(), b.B, b.S);
  const double z = bf16.loss(b.inputs.data(), b.targets.data(), b.B, b.S);
  EXPECT_NEAR(z, a, 1e-2 * a);
  EXPECT_NE(z, a);  // the bf16 weights are really used
}

}  // namespace
}  // namespace parallm::train

namespace parallm::train {
namespace {

// Not a test: a rough timing of one rank's forward + backward on a model of ~20M parameters
// (run with --gtest_also_run_disabled_tests --gtest_filter='*Timing*').
TEST(TrainModel, DISABLED_Timing) {
  ModelConfig c = testing::tiny_train_config();
  c.hidden_size = 512, c.num_attention_heads = 8, c.num_key_value_heads = 8, c.head_dim = 64;
  c.intermediate_size = 1376, c.num_hidden_layers = 6, c.vocab_size = 8000;
  c.max_position_embeddings = 256;
  ParamStore ps(c, 1, 0);
  init_params(ps, c, 1);
  TrainModel m(c, ps, comm::Group());
  const Batch b = make_batch(c, 4, 256, 3);
  m.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f);
  const auto t0 = std::chrono::steady_clock::now();
  const int reps = 3;
  for (int i = 0; i < reps; ++i)
    m.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f);
  const double s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  const double tokens = static_cast<double>(b.B * b.S);
  std::printf("params %lld, %.3f s per step, %.0f tokens/s, %.1f GFLOP/s (6 N T)\n",
              static_cast<long long>(c.param_count()), s, tokens / s,
              6.0 * c.param_count() * tokens / s / 1e9);
}

}  // namespace
}  // namespace parallm::train

namespace parallm::train {
namespace {

// The training forward is the inference forward: stories260K (llama2.c, interleaved RoPE, GQA,
// tied) loaded into a ParamStore gives the loss that the engine's logits (f32 weights) give, at
// TP 1 and TP 2; so a model trained here generates as it trained.
TEST(TrainModel, LossEqualsInferenceCrossEntropyOnStories260K) {
  const std::string path = std::string(PARALLM_SOURCE_DIR) + "/models/stories260K/stories260K.bin";
  ModelConfig c;
  const std::unique_ptr<WeightSource> src = open_model(path, &c);
  const int64_t S = 24;
  const Batch b = make_batch(c, 1, S, 9);

  LlamaOptions lo;
  lo.weight_dtype = DType::F32;
  LlamaModel lm(c, *src, comm::Group(), lo);
  StageForward sf(lm, 1, S, S);
  std::vector<float> x(static_cast<size_t>(S * c.hidden_size)),
      logits(static_cast<size_t>(S * c.vocab_size));
  sf.embed(b.inputs.data(), S, x.data());
  sf.layers(x.data(), {parallel::SeqChunk{0, 0, S}});
  sf.head(x.data(), S, logits.data());
  double expect = 0;
  for (int64_t t = 0; t < S; ++t) {
    const float* row = logits.data() + t * c.vocab_size;
    double mx = row[0], sum = 0;
    for (int64_t j = 0; j < c.vocab_size; ++j) mx = std::max<double>(mx, row[j]);
    for (int64_t j = 0; j < c.vocab_size; ++j) sum += std::exp(row[j] - mx);
    expect += std::log(sum) + mx - row[b.targets[t]];
  }
  for (int tp : {1, 2}) {
    comm::launch(tp, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
      ModelConfig own;  // one reader per rank thread
      ParamStore ps(c, tp, world.rank());
      ps.load(*open_model(path, &own));
      TrainModel m(c, ps, world);
      const double loss = m.loss(b.inputs.data(), b.targets.data(), 1, S);
      EXPECT_NEAR(loss, expect, 1e-5 * expect) << "TP " << tp;
    });
  }
}

}  // namespace
}  // namespace parallm::train
