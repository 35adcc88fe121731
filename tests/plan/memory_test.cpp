// Memory per device: sharding of the parameters, KV cache, activations (Korthikanti et al.),
// training states. The seed scenario (LLaMA-2 70B, fp16, 4 devices) is worked by hand.
#include "parallm/plan/memory.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "parallm/model/llama_tensors.h"
#include "parallm/pipeline/partition.h"
#include "parallm/pipeline/schedule.h"
#include "parallm/pipeline/simulator.h"
#include "parallm/plan/model_presets.h"

namespace parallm::plan {
namespace {

TEST(Memory, StagesAddUpToTheModel) {
  for (const ModelPreset& p : model_presets()) {
    SCOPED_TRACE(p.name);
    for (int pp : {1, 2, 3, 4}) {
      double sum = 0;
      for (int s = 0; s < pp; ++s) sum += stage_params(p.config, {1, pp, 1, 1}, s).total();
      // Tied embeddings split over stages keep a copy at each end (Megatron-LM).
      const double extra = p.config.tie_word_embeddings && pp > 1
                               ? double(p.config.vocab_size) * double(p.config.hidden_size)
                               : 0.0;
      EXPECT_DOUBLE_EQ(sum, double(p.config.param_count()) + extra) << "pp=" << pp;
    }
  }
}

TEST(Memory, SeedScenarioWeightsAndKvByHand) {
  const ModelConfig c = resolve_model("llama-2-70b");
  // TP=4, per device: q and o 2 x 8192 x 8192/4; k and v 2 x 8192 x (8/4 heads x 128); gate, up,
  // down 3 x 8192 x 28672/4; two norms 2 x 8192.
  const double layer = 2.0 * 8192 * 2048 + 2.0 * 8192 * 256 + 3.0 * 8192 * 7168 + 2 * 8192;
  EXPECT_EQ(layer, 213925888.0);
  const double tp4 = 80 * layer + 8000.0 * 8192 /*embedding slice*/ + 8000.0 * 8192 /*head*/ + 8192;
  EXPECT_DOUBLE_EQ(stage_params(c, {4, 1, 1, 1}, 0).total(), tp4);
  InferenceWorkload w;
  w.batch = 8;
  w.prompt_len = 512;
  w.output_len = 128;
  const MemoryBreakdown m4 = inference_memory(c, {4, 1, 1, 1}, w, 0, 8, 8);
  // Matrices in fp16, the norms (two per layer and the final one) in f32 as the engine keeps them.
  const double norms = 80 * 2 * 8192.0 + 8192;
  EXPECT_DOUBLE_EQ(m4.weights, (tp4 - norms) * 2 + norms * 4);  // 34.49 GB of fp16
  EXPECT_NEAR(m4.weights / 1e9, 34.49, 0.01);
  // KV cache: 2 (K, V) x 80 layers x 2 KV heads x 128 x 2 bytes = 81920 bytes per token, for
  // 8 x 640 tokens.
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(c, 4, 80, Precision::FP16), 81920.0);
  EXPECT_DOUBLE_EQ(m4.kv_cache, 81920.0 * 8 * 640);

  // PP=4: 20 whole layers per stage (855,654,400 parameters each); the first stage adds the
  // embedding, the last the output projection and the final norm.
  const double full_layer = 2.0 * 8192 * 8192 + 2.0 * 8192 * 1024 + 3.0 * 8192 * 28672 + 2 * 8192;
  EXPECT_EQ(full_layer, 855654400.0);
  EXPECT_DOUBLE_EQ(stage_params(c, {1, 4, 1, 1}, 0).total(), 20 * full_layer + 32000.0 * 8192);
  EXPECT_DOUBLE_EQ(stage_params(c, {1, 4, 1, 1}, 3).total(),
                   20 * full_layer + 32000.0 * 8192 + 8192);
  EXPECT_DOUBLE_EQ(stage_params(c, {1, 4, 1, 1}, 1).total(), 20 * full_layer);
  // KV per token: 2 x 20 layers x 8 heads x 128 x 2 bytes: the same 81920 as TP=4.
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(c, 1, 20, Precision::FP16), 81920.0);
  // Lower precision scales weights and KV.
  InferenceWorkload q = w;
  q.weights = Precision::INT4;
  q.kv_cache = Precision::FP8;
  const MemoryBreakdown m4q = inference_memory(c, {4, 1, 1, 1}, q, 0, 8, 8);
  EXPECT_DOUBLE_EQ(m4q.weights, (tp4 - norms) * 0.5 + norms * 4);
  EXPECT_DOUBLE_EQ(m4q.kv_cache, 40960.0 * 8 * 640);
}

TEST(Memory, KvHeadsAreReplicatedWhenTpExceedsThem) {
  const ModelConfig c = resolve_model("llama-2-70b");  // 8 KV heads
  EXPECT_EQ(kv_heads_per_rank(c, 8), 1);
  EXPECT_EQ(kv_heads_per_rank(c, 16), 1);  // replicated, not half a head
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(c, 16, 80, Precision::FP16), 2.0 * 80 * 1 * 128 * 2);
  // So 16 ranks hold twice the KV of a perfect split.
  EXPECT_DOUBLE_EQ(16 * kv_bytes_per_token(c, 16, 80, Precision::FP16),
                   2 * kv_bytes_per_token(c, 1, 80, Precision::FP16));
}

TEST(Memory, LayoutProblemsAreNamed) {
  const ModelConfig c = resolve_model("llama-2-70b");
  EXPECT_EQ(layout_problem(c, {4, 1, 1, 1}), "");
  EXPECT_NE(layout_problem(c, {3, 1, 1, 1})
                .find("does not divide the 64 attention heads (the engine runs TP sizes 1, 2, 4, "
                      "8, 16, 32, 64)"),
            std::string::npos);
  ModelConfig kv6 = c;  // 64 heads, 6 KV heads: TP 4 divides the heads but not the KV heads
  kv6.num_attention_heads = 48;
  kv6.num_key_value_heads = 6;
  kv6.head_dim = 8192 / 48;
  EXPECT_NE(layout_problem(kv6, {4, 1, 1, 1})
                .find("TP=4 neither divides nor is a multiple of the 6 KV heads (the engine runs "
                      "TP sizes 1, 2, 3, 6, 12, 24, 48)"),
            std::string::npos)
      << layout_problem(kv6, {4, 1, 1, 1});
  EXPECT_NE(layout_problem(c, {1, 81, 1, 1}).find("exceeds the 80 layers"), std::string::npos);
  EXPECT_NE(layout_problem(c, {1, 1, 2, 2}).find("mixture-of-experts"), std::string::npos);
  const ModelConfig mix = resolve_model("mixtral-8x7b");
  EXPECT_EQ(layout_problem(mix, {1, 1, 8, 8}), "");
  // Uneven expert splits run (the first E % EP ranks hold one more); more ranks than experts not.
  EXPECT_EQ(layout_problem(mix, {1, 1, 3, 3}), "");
  EXPECT_NE(layout_problem(mix, {1, 1, 16, 16}).find("exceeds the 8 experts"), std::string::npos);
  EXPECT_NE(layout_problem(mix, {1, 1, 2, 4}).find("must divide DP"), std::string::npos);
  EXPECT_THROW(stage_params(c, {3, 1, 1, 1}, 0), std::invalid_argument);
  // Experts split over EP.
  EXPECT_DOUBLE_EQ(stage_params(mix, {1, 1, 8, 8}, 0).experts * 8,
                   stage_params(mix, {1, 1, 1, 1}, 0).experts);
}

// stories260K's shape: an FFN of 172 that TP 8 does not divide. The engine runs it (shards of 21
// and 22 rows), so the planner accepts it and counts the fullest rank.
ModelConfig stories_shape() {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 172;
  c.num_hidden_layers = 5;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 8;
  c.vocab_size = 512;
  c.tie_word_embeddings = true;
  c.validate("stories");
  return c;
}

TEST(Memory, UnevenFfnRunsAsTheEngineSplitsIt) {
  const ModelConfig c = stories_shape();
  EXPECT_EQ(layout_problem(c, {8, 1, 1, 1}), "");
  // Rank r holds FFN rows [172 r / 8, 172 (r + 1) / 8): 21 on rank 0, 22 on rank 1.
  EXPECT_DOUBLE_EQ(stage_params(c, {8, 1, 1, 1}, 0, 0).mlp, 5 * 3 * 21 * 64.0);
  EXPECT_DOUBLE_EQ(stage_params(c, {8, 1, 1, 1}, 0, 1).mlp, 5 * 3 * 22 * 64.0);
  EXPECT_DOUBLE_EQ(stage_params(c, {8, 1, 1, 1}, 0).mlp, 5 * 3 * 22 * 64.0);  // the fullest
  // TP 8 over 4 KV heads: one head per rank, replicated on 2 ranks.
  EXPECT_DOUBLE_EQ(stage_params(c, {8, 1, 1, 1}, 0, 3).attention, 5 * (2.0 * 8 * 64 + 2 * 8 * 64));
  // Every rank's bytes are the tensor table's (the engine's) count.
  for (int r = 0; r < 8; ++r)
    EXPECT_EQ(rank_weight_bytes(c, {8, 1, 1, 1}, Precision::BF16, 0, r),
              double(llama_rank_weight_bytes(c, DType::BF16, 8, r, 0, 5)))
        << "rank " << r;
  // 9 heads would not fit TP 8 at all.
  ModelConfig odd = c;
  odd.num_attention_heads = 9;
  odd.num_key_value_heads = 3;
  odd.hidden_size = 72;
  EXPECT_NE(layout_problem(odd, {8, 1, 1, 1}).find("does not divide the 9 attention heads"),
            std::string::npos);
}

TEST(Memory, StagesTakeTheEnginesPartition) {
  // 22 layers over 3 stages: pipeline::partition_layers gives the leftover layer to the middle.
  EXPECT_EQ(layers_per_stage(22, 3), (std::vector<int64_t>{7, 8, 7}));
  EXPECT_EQ(layers_per_stage(5, 2), (std::vector<int64_t>{3, 2}));
  const ModelConfig c = stories_shape();
  for (int pp : {2, 3}) {
    const std::vector<pipeline::StageLayers> stages = pipeline::partition_layers(5, pp);
    for (int s = 0; s < pp; ++s) {
      EXPECT_EQ(stage_params(c, {1, pp, 1, 1}, s).layers, stages[s].count());
      EXPECT_EQ(
          rank_weight_bytes(c, {1, pp, 1, 1}, Precision::FP32, s, 0),
          double(llama_rank_weight_bytes(c, DType::F32, 1, 0, stages[s].begin, stages[s].end)));
    }
  }
}

TEST(Memory, KorthikantiFormulaStructure) {
  // GPT-3 175B shape from the paper: s 2048, h 12288, a 96, t 8, b 1.
  const int64_t s = 2048, b = 1, h = 12288, a = 96;
  const double sbh = double(s) * b * h;
  EXPECT_DOUBLE_EQ(korthikanti_gpt_bytes_per_layer(s, b, h, a, 1, false, Recompute::None),
                   sbh * (34 + 5.0 * a * s / h));
  EXPECT_DOUBLE_EQ(korthikanti_gpt_bytes_per_layer(s, b, h, a, 8, false, Recompute::None),
                   sbh * (10 + 24.0 / 8 + 5.0 * a * s / (h * 8)));
  EXPECT_DOUBLE_EQ(korthikanti_gpt_bytes_per_layer(s, b, h, a, 8, true, Recompute::None),
                   sbh / 8 * (34 + 5.0 * a * s / h));
  EXPECT_DOUBLE_EQ(korthikanti_gpt_bytes_per_layer(s, b, h, a, 8, true, Recompute::Selective),
                   sbh * 34 / 8);
  EXPECT_DOUBLE_EQ(korthikanti_gpt_bytes_per_layer(s, b, h, a, 8, true, Recompute::Full),
                   2 * sbh / 8);

  // The LLaMA version: 8 sbh replicated, the projections split, 2 b (a/t) s^2 for softmax.
  const ModelConfig c = resolve_model("llama-2-7b");  // h 4096, ffn 11008, 32 heads (MHA)
  const double T = 4096.0 * 2, H = 4096;
  const double shard4 = 2 * T * (2 * H / 4 + 2 * (8 * 128) + 4 * 11008.0 / 4);
  const double scores4 = 2.0 * 2 * (32.0 / 4) * 4096 * 4096;
  EXPECT_DOUBLE_EQ(activation_bytes_per_layer(c, 4096, 2, 4, false, Recompute::None),
                   8 * T * H + shard4 + scores4);
  EXPECT_DOUBLE_EQ(activation_bytes_per_layer(c, 4096, 2, 4, true, Recompute::None),
                   8 * T * H / 4 + shard4 + scores4);
  EXPECT_DOUBLE_EQ(activation_bytes_per_layer(c, 4096, 2, 4, true, Recompute::Selective),
                   8 * T * H / 4 + shard4);
  EXPECT_DOUBLE_EQ(activation_bytes_per_layer(c, 4096, 2, 4, true, Recompute::Full), 2 * T * H / 4);
  // With SP, everything divides by t: t=1 total over t equals the SP figure at t when kv heads
  // split evenly.
  EXPECT_NEAR(activation_bytes_per_layer(c, 4096, 2, 1, false, Recompute::Selective) / 4,
              activation_bytes_per_layer(c, 4096, 2, 4, true, Recompute::Selective), 1e-6);
}

TEST(Memory, TrainingStatesAndZero) {
  const ModelConfig c = resolve_model("llama-2-7b");
  TrainingWorkload w;
  w.seq_len = 2048;
  w.micro_batch = 1;
  w.recompute = Recompute::Selective;
  const Layout l{1, 1, 4, 1};
  const double P = stage_params(c, l, 0).total();
  const MemoryBreakdown z0 = training_memory(c, l, w, 0, 1.0);
  EXPECT_DOUBLE_EQ(z0.weights, 2 * P);
  EXPECT_DOUBLE_EQ(z0.gradients, 2 * P);
  EXPECT_DOUBLE_EQ(z0.optimizer, 12 * P);  // fp32 master + Adam m, v: 16 bytes/param in all
  w.zero = 1;
  EXPECT_DOUBLE_EQ(training_memory(c, l, w, 0, 1.0).optimizer, 3 * P);
  w.zero = 2;
  EXPECT_DOUBLE_EQ(training_memory(c, l, w, 0, 1.0).gradients, 0.5 * P);
  w.zero = 3;
  EXPECT_DOUBLE_EQ(training_memory(c, l, w, 0, 1.0).weights, 0.5 * P);
  w.optimizer = Optimizer::SGD;
  EXPECT_DOUBLE_EQ(training_memory(c, l, w, 0, 1.0).optimizer, 2 * P);
  // Activations scale with the micro-batches in flight, on top of a fixed scratch.
  w.zero = 0;
  const double a0 = training_memory(c, l, w, 0, 0.0).activations;
  const double a1 = training_memory(c, l, w, 0, 1.0).activations;
  EXPECT_GT(a0, 0);
  EXPECT_DOUBLE_EQ(training_memory(c, l, w, 0, 4.0).activations - a0, 4 * (a1 - a0));
  // One micro-batch: the 32 layers and the head of activation_bytes_per_chunk at 2 bytes a value.
  ActivationShape s;
  s.seq_len = 2048;
  s.recompute = 1;
  s.layers = 32;
  s.head = true;
  EXPECT_DOUBLE_EQ(a1 - a0, double(activation_bytes_per_chunk(c, s)) / 2);
  // parallm's engine (f32): 4 + 4 bytes of weights and gradients, Adam's m and v 8, activations
  // x 2.
  w.precision = Precision::FP32;
  const MemoryBreakdown f = training_memory(c, l, w, 0, 1.0);
  EXPECT_DOUBLE_EQ(f.weights, 4 * P);
  EXPECT_DOUBLE_EQ(f.gradients, 4 * P);
  EXPECT_DOUBLE_EQ(f.optimizer, 4 * P);  // SGD's momentum
  w.optimizer = Optimizer::Adam;
  EXPECT_DOUBLE_EQ(training_memory(c, l, w, 0, 1.0).optimizer, 8 * P);
  EXPECT_DOUBLE_EQ(f.activations, 2 * a1);
}

// The per-stage peak walks the schedule's action list: 1F1B holds min(p - r, m) micro-batches on
// stage r, GPipe m; the head's stage adds its chunk; interleaved chunks hold their own layers.
TEST(Memory, StageActivationsWalkTheSchedule) {
  const ModelConfig c = resolve_model("tinyllama-1.1b");  // 22 layers
  TrainingWorkload w;
  w.seq_len = 2048;
  w.micro_batch = 1;
  w.recompute = Recompute::Selective;
  w.precision = Precision::FP32;
  const Layout l{1, 4, 1, 1};
  ActivationShape a;
  a.seq_len = 2048;
  a.recompute = 1;
  a.layers = 1;
  const double layer = double(activation_bytes_per_chunk(c, a));
  EXPECT_EQ(layer, 243286016.0);  // 232.0 MiB and two rstd rows
  a.layers = 0;
  a.head = true;
  const double head = double(activation_bytes_per_chunk(c, a));
  const int counts[4] = {5, 6, 6, 5};  // partition_layers(22, 4)
  const auto one = stage_activations(c, l, w, pipeline::one_f_one_b(4, 8));
  const auto gp = stage_activations(c, l, w, pipeline::gpipe(4, 8));
  for (int r = 0; r < 4; ++r) {
    SCOPED_TRACE(r);
    const double per = counts[r] * layer + (r == 3 ? head : 0);
    EXPECT_DOUBLE_EQ(one[r].per_micro_batch, per);
    EXPECT_EQ(one[r].peak_states, 4 - r);
    EXPECT_DOUBLE_EQ(one[r].peak_bytes, (4 - r) * per);
    EXPECT_EQ(gp[r].peak_states, 8);
    EXPECT_DOUBLE_EQ(gp[r].peak_bytes, 8 * per);
  }
  // The guide's table: stage 0 under 1F1B, 4 x 1.13 GiB = 4.53 GiB.
  EXPECT_NEAR(one[0].peak_bytes / (1 << 30), 4.53, 0.005);
  // Interleaved, v = 2: 8 virtual stages of 2 or 3 layers (partition_layers(22, 8):
  // 2,3,3,3,3,3,3,2); stage 0 holds chunks 0 (2 layers) and 4 (3 layers); Megatron's count of
  // chunk states on stage 0: min(m v, 2 (p - 1) + (v - 1) p + 1) = 11.
  const auto il = stage_activations(c, l, w, pipeline::interleaved(4, 8, 2));
  EXPECT_EQ(il[0].peak_states, 11);
  EXPECT_DOUBLE_EQ(il[0].per_micro_batch, 5 * layer);
  EXPECT_GT(il[0].peak_bytes, 11 * 2 * layer);
  EXPECT_LE(il[0].peak_bytes, 11 * 3 * layer);
  // The last stage's last chunk (virtual stage 7, 2 layers) has the head.
  EXPECT_DOUBLE_EQ(il[3].per_micro_batch, 5 * layer + head);
  // 16 bits halve every byte.
  w.precision = Precision::BF16;
  EXPECT_DOUBLE_EQ(stage_activations(c, l, w, pipeline::one_f_one_b(4, 8))[0].peak_bytes,
                   one[0].peak_bytes / 2);
}

}  // namespace
}  // namespace parallm::plan

namespace parallm::plan {
namespace {

// The planner's walk of the action lists counts the states the simulator counts, for every
// schedule, and ZB-H1's states past B are held at the B-to-W size.
TEST(Memory, StageActivationsAgreeWithTheSimulatorOnEverySchedule) {
  const ModelConfig c = resolve_model("small");  // 4 layers
  TrainingWorkload w;
  w.seq_len = 16;
  w.micro_batch = 1;
  w.precision = Precision::FP32;
  for (int p : {1, 2, 4}) {
    for (int m : {1, 2, 3, 6}) {
      std::vector<pipeline::Schedule> lists = {pipeline::gpipe(p, m), pipeline::one_f_one_b(p, m),
                                               pipeline::zb_h1(p, m)};
      if (p == 2 && m % p == 0) lists.push_back(pipeline::interleaved(p, m, 2));
      for (const pipeline::Schedule& s : lists) {
        SCOPED_TRACE(s.name());
        const pipeline::SimResult sim = pipeline::simulate(s);
        const auto acts = stage_activations(c, {1, p, 1, 1}, w, s);
        for (int r = 0; r < p; ++r) {
          EXPECT_EQ(acts[r].peak_states, sim.peak_in_flight_chunks[r]) << r;
          const double whole = acts[r].peak_states * acts[r].per_micro_batch;
          if (s.kind == pipeline::ScheduleKind::ZeroBubbleH1)
            EXPECT_LE(acts[r].peak_bytes, 2 * whole) << r;
          else if (s.chunks == 1)
            EXPECT_DOUBLE_EQ(acts[r].peak_bytes, whole) << r;
          else
            EXPECT_LT(acts[r].peak_bytes, whole) << r;
          EXPECT_GT(acts[r].peak_bytes, 0) << r;
        }
      }
    }
  }
  // One stage, ZB-H1 with one micro-batch: F, then B (the state shrinks to what W needs), then W.
  // The peak is the larger of the whole state and W's part.
  ActivationShape a;
  a.seq_len = 16;
  a.layers = 4;
  a.head = true;
  a.recompute = 1;  // TrainingWorkload's default, selective
  const double whole = double(activation_bytes_per_chunk(c, a));
  const double for_w = double(weight_grad_bytes_per_chunk(c, a, true));
  const auto one = stage_activations(c, {1, 1, 1, 1}, w, pipeline::zb_h1(1, 1));
  EXPECT_DOUBLE_EQ(one[0].peak_bytes, std::max(whole, for_w));
}

}  // namespace
}  // namespace parallm::plan
