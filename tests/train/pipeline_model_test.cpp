// TrainModel's per-chunk pipeline calls against the one-chunk forward_backward: a model split
// into 2 and 3 stages (uneven) and into interleaved chunks, run stage after stage on each TP rank
// (TP 1 and 2 on threads), gives the same losses and gradients bit for bit (the tied embedding's
// two halves summed within 1e-6); full recomputation is bitwise the same as none; the
// ActivationStats equal the documented per-layer sums times the states held; ParamStore holds
// exactly a stage's tensors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/core/thread_pool.h"
#include "parallm/parallel/shard.h"
#include "parallm/pipeline/partition.h"
#include "parallm/train/model.h"
#include "parallm/train/params.h"
#include "test_util.h"
#include "train/train_config.h"

namespace parallm::train {
namespace {

using pipeline::StageLayers;
using Full = std::vector<std::pair<std::string, Tensor>>;

struct Batch {
  std::vector<int32_t> inputs, targets;
  int64_t B = 0, S = 0;
};

Batch make_batch(const ModelConfig& c, int64_t B, int64_t S, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(c.vocab_size - 1));
  Batch b{{}, {}, B, S};
  for (int64_t i = 0; i < B * S; ++i) {
    b.inputs.push_back(id(rng));
    b.targets.push_back(id(rng));
  }
  return b;
}

std::vector<Batch> batches_for(const ModelConfig& c) {
  // Repeated ids inside a batch on purpose (vocabulary 67): the embedding's gradient rows add up.
  return {make_batch(c, 2, 7, 1), make_batch(c, 3, 5, 2), make_batch(c, 1, 9, 3)};
}

// The documented activation floats of one held (micro-batch, chunk) state (PLAN12.md, model.h).
int64_t state_floats(const ModelConfig& c, int tp, int rank, int64_t B, int64_t S, int64_t layers,
                     bool head, Recompute r) {
  const parallel::HeadPlan h =
      parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, tp, rank);
  const int64_t T = B * S, H = c.hidden_size, qd = h.q_heads * c.head_dim,
                kvd = h.kv_heads * c.head_dim;
  const int64_t f = parallel::ShardSpec::even(c.intermediate_size, tp, rank).size();
  const int64_t v = parallel::ShardSpec::even(c.vocab_size, tp, rank).size();
  int64_t layer = 4 * T * H + 2 * T + 2 * T * qd + 2 * T * kvd + 3 * T * f;
  if (r == Recompute::None) layer += B * h.q_heads * S * S;
  if (r == Recompute::Full) layer = T * H;
  return layers * layer + (head ? 2 * T * H + T + T * v : 0);
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
// forward (virtual stage 0 first), then every backward (the last virtual stage first). Checks
// the ActivationStats against state_floats while all forwards are in flight.
PipeResult run_pipeline(const ModelConfig& c, int tp, int pp, int v,
                        const std::vector<StageLayers>& vs, const std::vector<Batch>& batches,
                        Recompute recompute, float scale) {
  PipeResult out;
  std::mutex mu;
  comm::launch(tp, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
    ThreadPool pool(1);
    ScopedPool scope(pool);
    std::vector<std::unique_ptr<ParamStore>> stores;
    std::vector<std::unique_ptr<TrainModel>> models;
    std::vector<int> hooks(static_cast<size_t>(pp), 0);
    for (int r = 0; r < pp; ++r) {
      TrainModelOptions o = pipeline_chunks({.recompute = recompute}, vs, pp, r, v);
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
      acts[mb].assign(nv, std::vector<float>(b.B * b.S * H));
      grads[mb].assign(nv, std::vector<float>(b.B * b.S * H));
      for (int s = 0; s < nv; ++s) {
        TrainModel& m = *models[s % pp];
        const double l = m.forward(static_cast<int>(mb), s / pp, b.inputs.data(), b.targets.data(),
                                   b.B, b.S, scale, s > 0 ? acts[mb][s - 1].data() : nullptr,
                                   s + 1 < nv ? acts[mb][s].data() : nullptr);
        if (s + 1 == nv) losses[mb] = l;
        else EXPECT_EQ(l, 0.0);
      }
    }
    for (int r = 0; r < pp; ++r) {
      const TrainModel::ActivationStats st = models[r]->activation_stats();
      int64_t floats = 0;
      for (int ch = 0; ch < v; ++ch) {
        const StageLayers& sl = vs[ch * pp + r];
        for (const Batch& b : batches)
          floats += state_floats(c, tp, world.rank(), b.B, b.S, sl.count(),
                                 ch == v - 1 && r == pp - 1, recompute);
      }
      EXPECT_EQ(st.in_flight, static_cast<int>(batches.size()) * v) << "pipeline rank " << r;
      EXPECT_EQ(st.peak_in_flight, st.in_flight);
      EXPECT_EQ(st.held_bytes, floats * 4) << "pipeline rank " << r;
      EXPECT_EQ(st.peak_bytes, st.held_bytes);
    }
    for (size_t mb = 0; mb < batches.size(); ++mb) {
      for (int s = nv - 1; s >= 0; --s) {
        models[s % pp]->backward(static_cast<int>(mb), s / pp,
                                 s + 1 < nv ? grads[mb][s + 1].data() : nullptr,
                                 s > 0 ? grads[mb][s].data() : nullptr, mb + 1 == batches.size());
      }
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
                         Recompute recompute, float scale) {
  PipeResult out;
  std::mutex mu;
  comm::launch(tp, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
    ThreadPool pool(1);
    ScopedPool scope(pool);
    ParamStore params(c, tp, world.rank());
    init_params(params, c, 42);
    TrainModel model(c, params, world, {.recompute = recompute});
    int hooks = 0;
    model.set_grad_ready_hook([&](const Param&) { ++hooks; });
    std::vector<double> losses;
    for (const Batch& b : batches)
      losses.push_back(
          model.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.S, scale));
    // forward_backward holds one state at a time.
    EXPECT_EQ(model.activation_stats().peak_in_flight, 1);
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

void expect_pipeline_matches(const ModelConfig& c, int tp, int pp, int v,
                             const std::vector<StageLayers>& vs, Recompute recompute) {
  const std::string what = "TP " + std::to_string(tp) + " PP " + std::to_string(pp) + " V " +
                           std::to_string(v) + (c.tie_word_embeddings ? " tied" : " untied") +
                           " recompute " + recompute_name(recompute);
  const std::vector<Batch> batches = batches_for(c);
  const PipeResult ref = run_reference(c, tp, batches, Recompute::None, 0.25f);
  const PipeResult got = run_pipeline(c, tp, pp, v, vs, batches, recompute, 0.25f);
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

TEST(TrainPipelineModel, FullRecomputeIsBitwiseNone) {
  ModelConfig c = testing::tiny_train_config(false, true);
  c.num_hidden_layers = 4;
  // Through the pipeline (stats checked against the full-recompute formula inside)...
  expect_pipeline_matches(c, 2, 2, 1, {{0, 2}, {2, 4}}, Recompute::Full);
  // ...and forward_backward alone.
  const std::vector<Batch> batches = batches_for(c);
  for (int tp : {1, 3}) {
    const PipeResult none = run_reference(c, tp, batches, Recompute::None, 0.5f);
    const PipeResult full = run_reference(c, tp, batches, Recompute::Full, 0.5f);
    EXPECT_EQ(full.losses, none.losses);
    EXPECT_EQ(full.hooks, none.hooks);
    for (const auto& [name, t] : none.grads)
      EXPECT_TRUE(bitwise_equal(full.grads.at(name), t)) << "TP " << tp << " " << name;
  }
}

TEST(TrainPipelineModel, ActivationStatsCountTheDocumentedVectors) {
  const ModelConfig c = testing::tiny_train_config(false, false);
  const Batch b = make_batch(c, 2, 6, 5);
  for (Recompute r : {Recompute::None, Recompute::Full}) {
    ParamStore ps(c, 1, 0);
    init_params(ps, c, 1);
    TrainModel m(c, ps, comm::Group(), {.recompute = r});
    const int64_t one = 4 * state_floats(c, 1, 0, b.B, b.S, c.num_hidden_layers, true, r);
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
  EXPECT_LT(state_floats(c, 1, 0, 2, 6, 2, false, Recompute::Full) * 5,
            state_floats(c, 1, 0, 2, 6, 2, false, Recompute::None));
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
  m.backward(3, 0, nullptr, nullptr, true);

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
                         {.chunks = {{1, 4}}, .has_embedding = false, .has_head = false});
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
