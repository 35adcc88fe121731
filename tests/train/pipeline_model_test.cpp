// TrainModel's per-chunk pipeline calls against the one-chunk forward_backward: a model split
// into 2 and 3 stages (uneven) and into interleaved chunks, run stage after stage on each TP rank
// (TP 1 and 2 on threads), gives the same losses and gradients bit for bit (the tied embedding's
// two halves summed within 1e-6); full recomputation is bitwise the same as none; the
// ActivationStats equal the documented per-layer sums times the states held; ParamStore holds
// exactly a stage's tensors.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/core/thread_pool.h"
#include "parallm/parallel/shard.h"
#include "parallm/pipeline/partition.h"
#include "parallm/train/model.h"
#include "parallm/train/params.h"
#include "sanitizer_build.h"
#include "test_util.h"
#include "train/train_config.h"

namespace parallm::train {
namespace {

using pipeline::StageLayers;
using Full = std::vector<std::pair<std::string, Tensor>>;

using testing::Batch;
using testing::make_batch;

TrainModelOptions with_recompute(Recompute r) {
  TrainModelOptions o;
  o.recompute = r;
  return o;
}

TrainModelOptions middle_chunk(StageLayers layers) {
  TrainModelOptions o;
  o.chunks = {layers};
  o.has_embedding = o.has_head = false;
  return o;
}

std::vector<Batch> batches_for(const ModelConfig& c) {
  // Repeated ids inside a batch on purpose (vocabulary 67): the embedding's gradient rows add up.
  return {make_batch(c, 2, 7, 1), make_batch(c, 3, 5, 2), make_batch(c, 1, 9, 3)};
}

// The documented activation floats of one held (micro-batch, chunk) state (PLAN12.md, model.h):
// R = this rank's rows (T, or its SP share). `after_b`: what ZB keeps between B and W.
int64_t state_floats(const ModelConfig& c, int tp, int rank, int64_t B, int64_t S, int64_t layers,
                     bool embedding, bool head, Recompute r, bool sp = false,
                     bool after_b = false) {
  const parallel::HeadPlan h =
      parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, tp, rank);
  const int64_t T = B * S, H = c.hidden_size, qd = h.q_heads * c.head_dim,
                kvd = h.kv_heads * c.head_dim;
  const int64_t R = sp ? parallel::ShardSpec::even(T, tp, rank).size() : T;
  const int64_t f = parallel::ShardSpec::even(c.intermediate_size, tp, rank).size();
  const int64_t v = parallel::ShardSpec::even(c.vocab_size, tp, rank).size();
  if (after_b) {
    // Per layer: xn1, xn2, attn, dqkv, the attention's and the MLP's output gradients, h, dgu;
    // the head: xf and dlogits; the embedding: its output's gradient.
    const int64_t layer = 2 * R * H + T * qd + T * (qd + 2 * kvd) + 2 * T * H + T * f + 2 * T * f;
    return layers * layer + (head ? R * H + T * v : 0) + (embedding ? R * H : 0);
  }
  int64_t layer = 4 * R * H + 2 * R + 2 * T * qd + 2 * T * kvd + 3 * T * f;
  if (r == Recompute::None) layer += B * h.q_heads * S * S;
  if (r == Recompute::Full) layer = R * H;
  return layers * layer + (head ? 2 * R * H + R + T * v : 0);
}

struct PipeResult {
  std::vector<double> losses;
  std::map<std::string, Tensor> grads;  // TP rank 0: every stage's gradients by name
  Tensor tied_first, tied_last;         // tied: the embedding's and the head's copy's gradients
  std::vector<int> hooks;               // per pipeline rank
  std::vector<size_t> params;           // per pipeline rank: tensors in its store
};

// Runs `batches` (gradients accumulating) through `pp` pipeline ranks of `v` chunks each over the
// virtual stages `vs`, every pipeline rank's model on each TP thread, GPipe's order: every
// forward (virtual stage 0 first), then every backward (the last virtual stage first); with `zb`
// every B, then every W, micro-batch by micro-batch. Checks the ActivationStats against
// state_floats while all forwards (and, ZB, all Bs) are in flight.
PipeResult run_pipeline(const ModelConfig& c, int tp, int pp, int v,
                        const std::vector<StageLayers>& vs, const std::vector<Batch>& batches,
                        const TrainModelOptions& base, bool zb, float scale) {
  PipeResult out;
  std::mutex mu;
  const bool sp = base.mode.sequence_parallel && tp > 1;
  comm::launch(tp, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
    ThreadPool pool(1);
    ScopedPool scope(pool);
    std::vector<std::unique_ptr<ParamStore>> stores;
    std::vector<std::unique_ptr<TrainModel>> models;
    std::vector<int> hooks(static_cast<size_t>(pp), 0);
    for (int r = 0; r < pp; ++r) {
      TrainModelOptions o = pipeline_chunks(base, vs, pp, r, v);
      stores.push_back(std::make_unique<ParamStore>(c, tp, world.rank(), stage_tensors(o)));
      init_params(*stores.back(), c, 42);
      models.push_back(std::make_unique<TrainModel>(c, *stores.back(), world, o));
      models.back()->set_grad_ready_hook([&hooks, r](const Param&) { ++hooks[r]; });
    }
    const int nv = pp * v;
    const int64_t H = c.hidden_size;
    // acts[mb][s]: virtual stage s's output; grads[mb][s]: the gradient of its input.
    std::vector<std::vector<std::vector<float>>> acts(batches.size()), grads(batches.size());
    std::vector<double> losses(batches.size(), 0.0);
    for (size_t mb = 0; mb < batches.size(); ++mb) {
      const Batch& b = batches[mb];
      const int64_t R = models[0]->activation_rows(b.B, b.S);
      EXPECT_EQ(R, sp ? parallel::ShardSpec::even(b.B * b.S, tp, world.rank()).size() : b.B * b.S);
      acts[mb].assign(nv, std::vector<float>(R * H));
      grads[mb].assign(nv, std::vector<float>(R * H));
      for (int s = 0; s < nv; ++s) {
        TrainModel& m = *models[s % pp];
        const double l = m.forward(static_cast<int>(mb), s / pp, b.inputs.data(), b.targets.data(),
                                   b.B, b.S, scale, s > 0 ? acts[mb][s - 1].data() : nullptr,
                                   s + 1 < nv ? acts[mb][s].data() : nullptr);
        if (s + 1 == nv) {
          losses[mb] = l;
        } else {
          EXPECT_EQ(l, 0.0);
        }
      }
    }
    auto expect_held = [&](bool after_b) {
      for (int r = 0; r < pp; ++r) {
        const TrainModel::ActivationStats st = models[r]->activation_stats();
        int64_t floats = 0;
        for (int ch = 0; ch < v; ++ch) {
          const StageLayers& sl = vs[ch * pp + r];
          for (const Batch& b : batches)
            floats += state_floats(c, tp, world.rank(), b.B, b.S, sl.count(), ch == 0 && r == 0,
                                   ch == v - 1 && r == pp - 1, base.recompute, sp, after_b);
        }
        EXPECT_EQ(st.in_flight, static_cast<int>(batches.size()) * v) << "pipeline rank " << r;
        EXPECT_EQ(st.peak_in_flight, st.in_flight);
        EXPECT_EQ(st.held_bytes, floats * 4) << "pipeline rank " << r << (after_b ? " after B" : "");
        if (!after_b) {
          EXPECT_EQ(st.peak_bytes, st.held_bytes);
        }
      }
    };
    expect_held(false);
    for (size_t mb = 0; mb < batches.size(); ++mb) {
      for (int s = nv - 1; s >= 0; --s) {
        const float* dy = s + 1 < nv ? grads[mb][s + 1].data() : nullptr;
        float* dx = s > 0 ? grads[mb][s].data() : nullptr;
        if (zb) {
          models[s % pp]->backward_input(static_cast<int>(mb), s / pp, dy, dx);
        } else {
          models[s % pp]->backward(static_cast<int>(mb), s / pp, dy, dx, mb + 1 == batches.size());
        }
      }
    }
    if (zb) {
      expect_held(true);
      for (size_t mb = 0; mb < batches.size(); ++mb)
        for (int s = nv - 1; s >= 0; --s)
          models[s % pp]->backward_weight(static_cast<int>(mb), s / pp, mb + 1 == batches.size());
    }
    for (int r = 0; r < pp; ++r) {
      const TrainModel::ActivationStats st = models[r]->activation_stats();
      EXPECT_EQ(st.in_flight, 0);
      EXPECT_EQ(st.held_bytes, 0);
      EXPECT_EQ(st.peak_in_flight, static_cast<int>(batches.size()) * v);
    }
    std::vector<Full> gathered;
    for (int r = 0; r < pp; ++r) gathered.push_back(gather_full_tensors(*stores[r], world, true));
    std::lock_guard<std::mutex> lock(mu);
    if (world.rank() != 0) return;
    out.losses = losses;
    out.hooks = hooks;
    for (int r = 0; r < pp; ++r) {
      out.params.push_back(stores[r]->params().size());
      for (auto& [name, t] : gathered[r]) {
        const bool copy = stores[r]->find(name).tied_copy;
        if (c.tie_word_embeddings && name == names::kEmbed && pp > 1) {
          (copy ? out.tied_last : out.tied_first) = t;
          continue;
        }
        EXPECT_EQ(out.grads.count(name), 0u) << name << " held by two stages";
        out.grads[name] = t;
      }
    }
  });
  return out;
}

// The reference: one chunk, forward_backward per micro-batch.
PipeResult run_reference(const ModelConfig& c, int tp, const std::vector<Batch>& batches,
                         const TrainModelOptions& options, float scale) {
  PipeResult out;
  std::mutex mu;
  comm::launch(tp, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
    ThreadPool pool(1);
    ScopedPool scope(pool);
    ParamStore params(c, tp, world.rank());
    init_params(params, c, 42);
    TrainModel model(c, params, world, options);
    int hooks = 0;
    model.set_grad_ready_hook([&](const Param&) { ++hooks; });
    std::vector<double> losses;
    for (const Batch& b : batches)
      losses.push_back(
          model.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.S, scale));
    // forward_backward holds one state at a time.
    EXPECT_EQ(model.activation_stats().peak_in_flight, 1);
    // Every rank returns the same loss, bitwise.
    for (double l : losses) {
      std::vector<double> all(static_cast<size_t>(tp));
      world.all_gather(&l, all.data(), 1, DType::I64);
      for (double x : all) EXPECT_EQ(x, l) << "TP " << tp;
    }
    Full g = gather_full_tensors(params, world, true);
    std::lock_guard<std::mutex> lock(mu);
    if (world.rank() != 0) return;
    out.losses = losses;
    out.hooks = {hooks};
    out.params = {params.params().size()};
    for (auto& [name, t] : g) out.grads[name] = t;
  });
  return out;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data<float>(), b.data<float>(), static_cast<size_t>(a.numel()) * 4) == 0;
}

double rel_diff(const Tensor& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = double(a.data<float>()[i]) - b[i];
    num += d * d;
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// The pipeline run with `options` (ZB's B/W calls when `zb`) against the one-chunk reference
// with the same sequence parallelism and no recomputation or split: bit for bit.
void expect_pipeline_matches(const ModelConfig& c, int tp, int pp, int v,
                             const std::vector<StageLayers>& vs, Recompute recompute,
                             bool sp = false, bool zb = false) {
  const std::string what = "TP " + std::to_string(tp) + " PP " + std::to_string(pp) + " V " +
                           std::to_string(v) + (c.tie_word_embeddings ? " tied" : " untied") +
                           " recompute " + recompute_name(recompute) + (sp ? " SP" : "") +
                           (zb ? " ZB" : "");
  const std::vector<Batch> batches = batches_for(c);
  TrainModelOptions ref_options;
  ref_options.mode.sequence_parallel = sp;
  TrainModelOptions options = ref_options;
  options.recompute = recompute;
  options.mode.defer_weight_grads = zb;
  const PipeResult ref = run_reference(c, tp, batches, ref_options, 0.25f);
  const PipeResult got = run_pipeline(c, tp, pp, v, vs, batches, options, zb, 0.25f);
  ASSERT_EQ(got.losses.size(), ref.losses.size()) << what;
  for (size_t i = 0; i < ref.losses.size(); ++i)
    EXPECT_EQ(got.losses[i], ref.losses[i]) << what << " micro-batch " << i;
  // The hook fires once per parameter of each stage (only with the last micro-batch's backward);
  // forward_backward fires it for every parameter of every micro-batch.
  ASSERT_EQ(got.hooks.size(), static_cast<size_t>(pp));
  size_t all = 0;
  for (int r = 0; r < pp; ++r) {
    EXPECT_EQ(got.hooks[r], static_cast<int>(got.params[r])) << what << " pipeline rank " << r;
    all += got.params[r];
  }
  EXPECT_EQ(ref.hooks[0], static_cast<int>(ref.params[0] * batches.size())) << what;
  const bool split_tied = c.tie_word_embeddings && pp > 1;
  EXPECT_EQ(all, ref.params[0] + (split_tied ? 1 : 0)) << what;
  for (const auto& [name, t] : ref.grads) {
    if (split_tied && name == names::kEmbed) {
      // The first stage's embedding rows plus the last stage's head product: the same terms as
      // the one-chunk sum, added in another order (one chunk adds mb 1's head product, then its
      // rows one token at a time, then mb 2's...; here each stage sums its own part first), so
      // equal to f32 rounding, not bitwise.
      ASSERT_TRUE(got.tied_first.defined() && got.tied_last.defined()) << what;
      std::vector<float> sum(static_cast<size_t>(t.numel()));
      for (int64_t i = 0; i < t.numel(); ++i)
        sum[i] = got.tied_first.data<float>()[i] + got.tied_last.data<float>()[i];
      EXPECT_LE(rel_diff(t, sum), 1e-6) << what;
      EXPECT_FALSE(bitwise_equal(t, got.tied_first)) << what << ": the head's part is missing";
      continue;
    }
    ASSERT_EQ(got.grads.count(name), 1u) << what << ": " << name << " missing";
    EXPECT_TRUE(bitwise_equal(got.grads.at(name), t)) << what << ": " << name;
  }
}

TEST(TrainPipelineModel, StagesMatchOneChunkUntied) {
  ModelConfig c = testing::tiny_train_config(false, false);
  c.num_hidden_layers = 5;
  for (int tp : {1, 2}) {
    expect_pipeline_matches(c, tp, 2, 1, {{0, 2}, {2, 5}}, Recompute::None);
    expect_pipeline_matches(c, tp, 3, 1, {{0, 1}, {1, 3}, {3, 5}}, Recompute::None);
  }
}

TEST(TrainPipelineModel, StagesMatchOneChunkTied) {
  ModelConfig c = testing::tiny_train_config(true, true);
  c.num_hidden_layers = 4;
  for (int tp : {1, 2}) {
    expect_pipeline_matches(c, tp, 2, 1, {{0, 1}, {1, 4}}, Recompute::None);
    expect_pipeline_matches(c, tp, 3, 1, {{0, 1}, {1, 3}, {3, 4}}, Recompute::None);
  }
}

TEST(TrainPipelineModel, InterleavedChunksMatchOneChunk) {
  for (bool tied : {false, true}) {
    ModelConfig c = testing::tiny_train_config(tied, false);
    c.num_hidden_layers = 6;
    // 2 pipeline ranks x 2 chunks: rank 0 holds virtual stages 0 and 2, rank 1 stages 1 and 3.
    expect_pipeline_matches(c, 2, 2, 2, pipeline::partition_layers(6, 4), Recompute::None);
  }
  // One pipeline rank with 3 chunks: the embedding and the head on one rank, tied or not.
  ModelConfig c = testing::tiny_train_config(true, false);
  c.num_hidden_layers = 3;
  expect_pipeline_matches(c, 1, 1, 3, {{0, 1}, {1, 2}, {2, 3}}, Recompute::None);
}

TEST(TrainPipelineModel, RecomputeIsBitwiseNone) {
  ModelConfig c = testing::tiny_train_config(false, true);
  c.num_hidden_layers = 4;
  // Through the pipeline (stats checked against each mode's formula inside)...
  expect_pipeline_matches(c, 2, 2, 1, {{0, 2}, {2, 4}}, Recompute::Full);
  expect_pipeline_matches(c, 2, 2, 1, {{0, 1}, {1, 4}}, Recompute::Selective);
  // ...and forward_backward alone.
  const std::vector<Batch> batches = batches_for(c);
  for (int tp : {1, 3}) {
    const PipeResult none = run_reference(c, tp, batches, {}, 0.5f);
    for (Recompute r : {Recompute::Selective, Recompute::Full}) {
      const PipeResult got = run_reference(c, tp, batches, with_recompute(r), 0.5f);
      EXPECT_EQ(got.losses, none.losses);
      EXPECT_EQ(got.hooks, none.hooks);
      for (const auto& [name, t] : none.grads)
        EXPECT_TRUE(bitwise_equal(got.grads.at(name), t))
            << "TP " << tp << " " << recompute_name(r) << " " << name;
    }
  }
}

double rel_frobenius(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double d = double(a.data<float>()[i]) - b.data<float>()[i];
    num += d * d;
    den += double(b.data<float>()[i]) * b.data<float>()[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(TrainPipelineModel, SequenceParallelMatchesWithout) {
  for (bool tied : {false, true}) {
    ModelConfig c = testing::tiny_train_config(tied, tied);
    c.num_hidden_layers = 3;
    const std::vector<Batch> batches = batches_for(c);  // 14, 15, 9 tokens: uneven over 2 and 3
    for (int tp : {2, 3}) {
      TrainModelOptions sp;
      sp.mode.sequence_parallel = true;
      const PipeResult off = run_reference(c, tp, batches, {}, 0.5f);
      const PipeResult on = run_reference(c, tp, batches, sp, 0.5f);
      const std::string what = "TP " + std::to_string(tp) + (tied ? " tied" : " untied");
      ASSERT_EQ(on.losses.size(), off.losses.size());
      for (size_t i = 0; i < off.losses.size(); ++i)
        EXPECT_NEAR(on.losses[i], off.losses[i], 1e-6 * std::abs(off.losses[i])) << what;
      EXPECT_EQ(on.hooks, off.hooks) << what;
      for (const auto& [name, t] : off.grads)
        EXPECT_LE(rel_frobenius(on.grads.at(name), t), 1e-6) << what << " " << name;
    }
    // SP through a pipeline (x and dx are this rank's rows between the stages): bitwise the
    // one-chunk SP run; the stats count R = this rank's rows in the SP regions.
    expect_pipeline_matches(c, 3, 2, 1, {{0, 1}, {1, 3}}, Recompute::None, true);
    expect_pipeline_matches(c, 2, 3, 1, {{0, 1}, {1, 2}, {2, 3}}, Recompute::Full, true);
  }
  // On one rank SP is the plain path, bit for bit.
  const ModelConfig c = testing::tiny_train_config();
  TrainModelOptions sp;
  sp.mode.sequence_parallel = true;
  const PipeResult off = run_reference(c, 1, batches_for(c), {}, 0.5f);
  const PipeResult on = run_reference(c, 1, batches_for(c), sp, 0.5f);
  EXPECT_EQ(on.losses, off.losses);
  for (const auto& [name, t] : off.grads) EXPECT_TRUE(bitwise_equal(on.grads.at(name), t)) << name;
}

TEST(TrainPipelineModel, ZeroBubbleSplitIsBitwiseTheWholeBackward) {
  for (bool tied : {false, true}) {
    ModelConfig c = testing::tiny_train_config(tied, false);
    c.num_hidden_layers = 4;
    expect_pipeline_matches(c, 1, 2, 1, {{0, 2}, {2, 4}}, Recompute::None, false, true);
    expect_pipeline_matches(c, 2, 2, 2, {{0, 1}, {1, 2}, {2, 3}, {3, 4}}, Recompute::Selective,
                            false, true);
    expect_pipeline_matches(c, 2, 2, 1, {{0, 1}, {1, 4}}, Recompute::Full, true, true);
  }
  // backward() of a model built for the split runs B then W: bitwise the plain one.
  const ModelConfig c = testing::tiny_train_config();
  TrainModelOptions zb;
  zb.mode.defer_weight_grads = true;
  const PipeResult plain = run_reference(c, 2, batches_for(c), {}, 0.5f);
  const PipeResult split = run_reference(c, 2, batches_for(c), zb, 0.5f);
  EXPECT_EQ(split.losses, plain.losses);
  EXPECT_EQ(split.hooks, plain.hooks);
  for (const auto& [name, t] : plain.grads)
    EXPECT_TRUE(bitwise_equal(split.grads.at(name), t)) << name;
}

TEST(TrainPipelineModel, ActivationStatsCountTheDocumentedVectors) {
  const ModelConfig c = testing::tiny_train_config(false, false);
  const Batch b = make_batch(c, 2, 6, 5);
  for (Recompute r : {Recompute::None, Recompute::Selective, Recompute::Full}) {
    ParamStore ps(c, 1, 0);
    init_params(ps, c, 1);
    TrainModel m(c, ps, comm::Group(), with_recompute(r));
    const int64_t one = 4 * state_floats(c, 1, 0, b.B, b.S, c.num_hidden_layers, true, true, r);
    for (int mb = 0; mb < 3; ++mb) {
      m.forward(mb, 0, b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f, nullptr, nullptr);
      EXPECT_EQ(m.activation_stats().held_bytes, (mb + 1) * one);
    }
    EXPECT_EQ(m.activation_stats().peak_in_flight, 3);
    m.backward(1, 0, nullptr, nullptr, false);
    EXPECT_EQ(m.activation_stats().held_bytes, 2 * one);
    EXPECT_EQ(m.activation_stats().in_flight, 2);
    m.forward(7, 0, b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f, nullptr, nullptr);
    EXPECT_EQ(m.activation_stats().peak_bytes, 3 * one);
    m.backward(0, 0, nullptr, nullptr, false);
    m.backward(2, 0, nullptr, nullptr, false);
    m.backward(7, 0, nullptr, nullptr, true);
    EXPECT_EQ(m.activation_stats().held_bytes, 0);
    EXPECT_EQ(m.activation_stats().peak_bytes, 3 * one);
    m.reset_stats();
    EXPECT_EQ(m.activation_stats().peak_bytes, 0);
    EXPECT_EQ(m.activation_stats().peak_in_flight, 0);
    // Evaluation holds nothing.
    m.loss(b.inputs.data(), b.targets.data(), b.B, b.S);
    EXPECT_EQ(m.activation_stats().peak_bytes, 0);
  }
  // Full recomputation keeps a fraction of none's.
  EXPECT_LT(state_floats(c, 1, 0, 2, 6, 2, false, false, Recompute::Full) * 5,
            state_floats(c, 1, 0, 2, 6, 2, false, false, Recompute::None));
}

TEST(TrainPipelineModel, ErrorsNameTheProblem) {
  ModelConfig c = testing::tiny_train_config();
  c.num_hidden_layers = 4;
  const Batch b = make_batch(c, 1, 4, 1);
  ParamStore ps(c, 1, 0);
  init_params(ps, c, 1);
  TrainModel m(c, ps, comm::Group());
  EXPECT_NE(testing::error_of([&] { m.backward(3, 0, nullptr, nullptr, true); })
                .find("micro-batch 3 has no forward in flight"),
            std::string::npos);
  m.forward(3, 0, b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f, nullptr, nullptr);
  EXPECT_NE(testing::error_of([&] {
              m.forward(3, 0, b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f, nullptr, nullptr);
            }).find("already in flight"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { m.backward(3, 1, nullptr, nullptr, true); }).find("chunk 1"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { m.backward_input(3, 0, nullptr, nullptr); })
                .find("defer_weight_grads"),
            std::string::npos);
  m.backward(3, 0, nullptr, nullptr, true);

  // ZB's calls out of order.
  TrainModelOptions zb;
  zb.mode.defer_weight_grads = true;
  TrainModel mz(c, ps, comm::Group(), zb);
  mz.forward(5, 0, b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f, nullptr, nullptr);
  EXPECT_NE(testing::error_of([&] { mz.backward_weight(5, 0, true); })
                .find("micro-batch 5 has not run backward_input through chunk 0"),
            std::string::npos);
  mz.backward_input(5, 0, nullptr, nullptr);
  EXPECT_NE(testing::error_of([&] { mz.backward_input(5, 0, nullptr, nullptr); })
                .find("already ran B"),
            std::string::npos);
  mz.backward_weight(5, 0, true);
  EXPECT_EQ(mz.activation_stats().in_flight, 0);

  // discard: evaluation through the per-chunk calls, and dropping a failed step's states.
  const double eval = mz.loss(b.inputs.data(), b.targets.data(), b.B, b.S);
  EXPECT_EQ(mz.forward(6, 0, b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f, nullptr, nullptr),
            eval);
  mz.forward(7, 0, b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f, nullptr, nullptr);
  mz.backward_input(7, 0, nullptr, nullptr);
  EXPECT_EQ(mz.activation_stats().in_flight, 2);
  mz.discard(6, 0);
  EXPECT_EQ(mz.activation_stats().in_flight, 1);
  EXPECT_NE(testing::error_of([&] { mz.discard(6, 0); }).find("discard: micro-batch 6"),
            std::string::npos);
  mz.discard_all();
  EXPECT_EQ(mz.activation_stats().in_flight, 0);
  EXPECT_EQ(mz.activation_stats().held_bytes, 0);

  // A middle stage: no embedding, no head; forward_backward refuses, x_in is required.
  const TrainModelOptions o = pipeline_chunks({}, {{0, 1}, {1, 3}, {3, 4}}, 3, 1, 1);
  EXPECT_EQ(o.chunks.size(), 1u);
  EXPECT_EQ(o.chunks[0].begin, 1);
  EXPECT_FALSE(o.has_embedding);
  EXPECT_FALSE(o.has_head);
  ParamStore mid(c, 1, 0, stage_tensors(o));
  TrainModel mm(c, mid, comm::Group(), o);
  EXPECT_NE(testing::error_of([&] {
              mm.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.S, 1.0f);
            }).find("PP 1"),
            std::string::npos);
  std::vector<float> x(static_cast<size_t>(4 * c.hidden_size));
  EXPECT_NE(testing::error_of([&] {
              mm.forward(0, 0, nullptr, nullptr, b.B, b.S, 1.0f, nullptr, x.data());
            }).find("needs x_in"),
            std::string::npos);
  // A store without the model's layers, embedding or head.
  EXPECT_NE(testing::error_of([&] {
              TrainModel(c, mid, comm::Group(),
                         middle_chunk({1, 4}));
            }).find("layer 3 of chunk 0"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { TrainModel(c, mid, comm::Group()); }).find("the embedding"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { pipeline_chunks({}, {{0, 2}, {2, 4}}, 2, 0, 2); })
                .find("2 layer ranges"),
            std::string::npos);
  EXPECT_EQ(parse_recompute("selective"), Recompute::Selective);
  EXPECT_STREQ(recompute_name(Recompute::Full), "full");
  EXPECT_EQ(testing::error_of([&] { parse_recompute("some"); }),
            "[--recompute] \"some\" is not a recomputation mode (none, selective, full)");
}

TEST(TrainParams, StageHoldsItsTensorsOnly) {
  for (bool tied : {false, true}) {
    ModelConfig c = testing::tiny_train_config(tied, false);
    c.num_hidden_layers = 5;
    const size_t per_layer = llama_layer_tensors(c, 0).size();
    StageTensors first{{{0, 2}}, true, false}, middle{{{2, 3}}, false, false},
        last{{{3, 5}}, false, true}, both{{{0, 1}, {4, 5}}, true, true};
    EXPECT_TRUE(first.holds_layer(1));
    EXPECT_FALSE(first.holds_layer(2));
    EXPECT_TRUE(both.holds_layer(4));
    EXPECT_FALSE(both.holds_layer(2));
    EXPECT_TRUE(StageTensors{}.holds_layer(4));
    ParamStore f(c, 2, 1, first), m(c, 2, 1, middle), l(c, 2, 1, last), b(c, 2, 1, both);
    EXPECT_EQ(f.params().size(), 1 + 2 * per_layer);
    EXPECT_EQ(m.params().size(), per_layer);
    EXPECT_EQ(l.params().size(), 2 * per_layer + 2);  // the final norm and the head (or copy)
    EXPECT_EQ(b.params().size(), 2 * per_layer + 2 + (tied ? 0 : 1));
    EXPECT_FALSE(f.find(names::kEmbed).tied_copy);
    EXPECT_NE(testing::error_of([&] { m.find(names::kEmbed); }).find(names::kEmbed),
              std::string::npos);
    EXPECT_NE(testing::error_of([&] { m.find(names::layer(0, "mlp.up_proj.weight")); })
                  .find("layers.0."),
              std::string::npos);
    if (tied) {
      EXPECT_TRUE(l.find(names::kEmbed).tied_copy);
      EXPECT_FALSE(l.find(names::kEmbed).counts_once(0));
      EXPECT_FALSE(b.find(names::kEmbed).tied_copy);
    } else {
      EXPECT_FALSE(l.find(names::kLmHead).tied_copy);
    }
    // The stages' parts add up to the whole model (the tied copy once more).
    EXPECT_EQ(f.params().size() + m.params().size() + l.params().size(),
              llama_tensors(c).size() + (tied ? 1 : 0));
    // init_params draws the same values for a stage's tensor as for the whole model's.
    ParamStore whole(c, 2, 1);
    init_params(whole, c, 9), init_params(l, c, 9);
    for (const Param& p : l.params())
      EXPECT_EQ(std::memcmp(l.value(p), whole.value(whole.find(p.tensor.name)), p.numel * 4), 0)
          << p.tensor.name;
  }
  ModelConfig c = testing::tiny_train_config();
  EXPECT_NE(testing::error_of([&] { ParamStore(c, 1, 0, StageTensors{{{1, 3}}, true, true}); })
                .find("[1, 3)"),
            std::string::npos);
}

}  // namespace
}  // namespace parallm::train

// ---- steady-state training allocates nothing in the model ----
// Counts the allocations of at least 1 KiB while a flag is on. The kernels make small transient
// allocations of their own (a tensor's strides, a std::function, a norm's column sums); every
// vector the model holds or lends is 1 KiB or more with the sizes below (T = 256 rows).

// Sanitizer builds keep their own operator new (ASan/TSan track every allocation through it), so
// the counter is compiled only into plain builds and the test is skipped under sanitizers.
#define PARALLM_COUNT_ALLOCATIONS (!PARALLM_SANITIZED)

namespace {
std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_allocs{0};
}  // namespace

#if PARALLM_COUNT_ALLOCATIONS
// GCC's -Wmismatched-new-delete cannot see that this file replaces new and delete as a pair (both
// over malloc/free) and warns wherever gtest's `new` is inlined; the pairing is right.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(size_t n) {
  if (n >= 1024 && g_counting.load(std::memory_order_relaxed)) g_allocs.fetch_add(1);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, size_t) noexcept {
  std::free(p);
}
#endif

namespace parallm::train {
namespace {

TEST(TrainPipelineModel, SteadyStateDoesNotAllocate) {
  if (!PARALLM_COUNT_ALLOCATIONS) GTEST_SKIP() << "sanitizer build: operator new is the sanitizer's";
  ModelConfig c = testing::tiny_train_config(true, false);
  c.num_hidden_layers = 2;
  c.max_position_embeddings = 128;
  const std::vector<Batch> batches = {make_batch(c, 2, 128, 1), make_batch(c, 2, 128, 2),
                                      make_batch(c, 2, 128, 3)};
  const char* names[] = {"none", "selective", "full", "ZB", "ZB + full"};
  for (int mode = 0; mode < 5; ++mode) {
    TrainModelOptions o;
    o.recompute = mode == 1 ? Recompute::Selective
                  : mode == 2 || mode == 4 ? Recompute::Full
                                           : Recompute::None;
    o.mode.defer_weight_grads = mode >= 3;
    ParamStore ps(c, 1, 0);
    init_params(ps, c, 3);
    TrainModel m(c, ps, comm::Group(), o);
    int64_t allocs = -1;
    for (int step = 0; step < 4; ++step) {
      g_allocs = 0;
      g_counting = step == 3;
      // Three micro-batches in flight at once, released out of order.
      for (size_t mb = 0; mb < batches.size(); ++mb)
        m.forward(static_cast<int>(mb), 0, batches[mb].inputs.data(), batches[mb].targets.data(),
                  batches[mb].B, batches[mb].S, 1.0f, nullptr, nullptr);
      for (int mb : {1, 0, 2}) {
        if (o.mode.defer_weight_grads) {
          m.backward_input(mb, 0, nullptr, nullptr);
        } else {
          m.backward(mb, 0, nullptr, nullptr, mb == 2);
        }
      }
      if (o.mode.defer_weight_grads)
        for (int mb : {0, 2, 1}) m.backward_weight(mb, 0, mb == 1);
      g_counting = false;
      allocs = g_allocs;
    }
    // The vocab-parallel cross-entropy (parallel/cross_entropy.cpp) allocates two [T] row
    // vectors per call; nothing else does. Without the state pool it would be dozens per
    // micro-batch.
    EXPECT_LE(allocs, 2 * static_cast<int64_t>(batches.size())) << names[mode];
  }
}

}  // namespace
}  // namespace parallm::train
