// activation_bytes_per_chunk: the engine's training model's held activations per (micro-batch,
// chunk), by hand on a small model with uneven TP splits, and the closed form of
// docs/parallelism-guide.md on TinyLlama.
#include <gtest/gtest.h>

#include <stdexcept>

#include "parallm/plan/cluster.h"
#include "parallm/plan/estimate.h"
#include "parallm/plan/memory.h"
#include "parallm/plan/model_presets.h"

namespace parallm::plan {
namespace {

// hidden 8, 4 query heads and 2 KV heads of 2, FFN 10, vocabulary 11: at TP 4 the KV heads are
// replicated, the FFN splits 2,3,2,3 and the vocabulary 2,3,3,3.
ModelConfig small() {
  ModelConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 10;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 2;
  c.vocab_size = 11;
  return c;
}

ActivationShape shape(int tp, int rank, bool sp, int recompute, int64_t layers, bool head) {
  ActivationShape a;
  a.micro_batch = 2;  // B = 2, S = 3: T = 6 tokens
  a.seq_len = 3;
  a.tp = tp;
  a.tp_rank = rank;
  a.sequence_parallel = sp;
  a.recompute = recompute;
  a.layers = layers;
  a.head = head;
  return a;
}

TEST(ActivationBytes, OneRankByHand) {
  const ModelConfig c = small();
  // Per layer: x, xn1, x2, xn2 and the two rstd: 6 x (4 x 8 + 2) = 204; q, attn 2 x 6 x 8 = 96;
  // k, v 2 x 6 x 4 = 48; gate|up and h 6 x 30 = 180; probs 2 x 4 x 3 x 3 = 72. 600 floats.
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, false, 0, 1, false)), 600 * 4);
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, false, 1, 1, false)), 528 * 4);  // no probs
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, false, 2, 1, false)), 48 * 4);   // x only
  // The head: xlast, xf 2 x 6 x 8, rstdf 6, dlogits 6 x 11: 168 floats, whatever the recompute.
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, false, 0, 0, true)), 168 * 4);
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, false, 0, 2, true)), (1200 + 168) * 4);
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, false, 2, 2, true)), (96 + 168) * 4);
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, false, 0, 0, false)), 0);
  // SP at TP 1 changes nothing.
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(1, 0, true, 0, 2, true)), (1200 + 168) * 4);
}

TEST(ActivationBytes, UnevenTpSplitsAndReplicatedKvHeadsByHand) {
  const ModelConfig c = small();
  // TP 4 rank 1: 1 query head (qd 2), 1 KV head replicated (kvd 2), FFN rows [2, 5) = 3,
  // vocabulary rows [2, 5) = 3; with SP token rows [1, 3) = 2 of 6.
  // Per layer: 2 x 34 + 6 x (2 x 2 + 2 x 2 + 3 x 3) + 2 x 1 x 9 = 68 + 102 + 18 = 188.
  // Head: 2 x 17 + 6 x 3 = 52.
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(4, 1, true, 0, 3, true)), (3 * 188 + 52) * 4);
  // Rank 0: 1 token row, FFN 2, vocabulary 2: 34 + 6 x 14 + 18 = 136; head 17 + 12 = 29.
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(4, 0, true, 0, 3, true)), (3 * 136 + 29) * 4);
  // Without SP every rank keeps all 6 rows of the norm region: rank 1 204 + 102 + 18 = 324.
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(4, 1, false, 0, 1, false)), 324 * 4);
  // Selective drops the 18 floats of probs; full keeps x: its 2 SP rows (16 floats) or all 6 (48).
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(4, 1, true, 1, 1, false)), 170 * 4);
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(4, 1, true, 2, 1, false)), 16 * 4);
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(4, 1, false, 2, 1, false)), 48 * 4);
  // TP 2: 2 query heads, 1 KV head each, FFN 5, vocabulary 5 and 6, 3 token rows under SP.
  // Rank 1: 3 x 34 + 6 x (8 + 4 + 15) + 2 x 2 x 9 = 102 + 162 + 36 = 300; head 3 x 17 + 36 = 87.
  EXPECT_EQ(activation_bytes_per_chunk(c, shape(2, 1, true, 0, 1, true)), (300 + 87) * 4);
}

TEST(ActivationBytes, SpAndEvenTpSplitTheOneRankTotal) {
  // When TP divides the heads, KV heads, FFN, vocabulary and tokens, the ranks' SP states add up
  // to the one-rank state: nothing is replicated.
  ModelConfig c = small();
  c.intermediate_size = 12;
  c.vocab_size = 12;
  for (int r = 0; r < 3; ++r) {
    int64_t sum = 0;
    for (int k = 0; k < 2; ++k) sum += activation_bytes_per_chunk(c, shape(2, k, true, r, 3, true));
    EXPECT_EQ(sum, activation_bytes_per_chunk(c, shape(1, 0, false, r, 3, true))) << r;
  }
}

TEST(ActivationBytes, TinyLlamaMatchesTheGuidesClosedForm) {
  // docs/parallelism-guide.md: per layer 4 s b (4h + 2 + 2 q_dim + 2 kv_dim + 3 ffn) + 4 a b s^2.
  const ModelConfig c = resolve_model("tinyllama-1.1b");  // h 2048, 32 heads, 4 KV, FFN 5632
  ActivationShape a;
  a.seq_len = 2048;
  a.layers = 1;
  const int64_t sb = 2048;
  const int64_t kept = 4 * sb * (4 * 2048 + 2 + 2 * 2048 + 2 * 256 + 3 * 5632);
  EXPECT_EQ(kept, 243286016);
  EXPECT_EQ(activation_bytes_per_chunk(c, a), kept + 4 * 32 * sb * sb);  // 780,156,928
  a.recompute = 1;
  EXPECT_EQ(activation_bytes_per_chunk(c, a), kept);
  a.recompute = 2;
  EXPECT_EQ(activation_bytes_per_chunk(c, a), 4 * sb * 2048);
  // 22 layers and the head at TP 2 with SP, rank 0: the SP region and the probs halve, K and V
  // (2 of 4 heads) halve, the vocabulary rows are 16000.
  a = {};
  a.seq_len = 2048;
  a.tp = 2;
  a.sequence_parallel = true;
  a.layers = 22;
  a.head = true;
  const int64_t layer =
      4 * (1024 * (4 * 2048 + 2) + 2048 * (2 * 1024 + 2 * 128 + 3 * 2816)) + 4 * 16 * sb * sb;
  EXPECT_EQ(activation_bytes_per_chunk(c, a),
            22 * layer + 4 * (1024 * (2 * 2048 + 1) + 2048 * 16000));
}

TEST(ActivationBytes, BadShapesAreNamed) {
  const ModelConfig c = small();
  auto message = [&](ActivationShape a) {
    try {
      activation_bytes_per_chunk(c, a);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  ActivationShape a = shape(2, 0, false, 0, 1, false);
  a.tp_rank = 2;
  EXPECT_NE(message(a).find("tp_rank 2"), std::string::npos) << message(a);
  a = shape(1, 0, false, 3, 1, false);
  EXPECT_NE(message(a).find("recompute"), std::string::npos) << message(a);
  a = shape(1, 0, false, 0, -1, false);
  EXPECT_NE(message(a).find("layers"), std::string::npos) << message(a);
  a = shape(1, 0, false, 0, 1, false);
  a.micro_batch = 0;
  EXPECT_NE(message(a).find("micro_batch"), std::string::npos) << message(a);
  a = shape(3, 0, false, 0, 1, false);  // 3 does not divide the 4 query heads
  EXPECT_NE(message(a), "no error");
}

}  // namespace
}  // namespace parallm::plan

namespace parallm::plan {
namespace {

// The training step time on CPU ranks from the kernels' measured rates, by hand for parallm's
// "small" shape (hidden 256, 4 layers, 8 heads of 32 over 4 KV heads, FFN 688, vocabulary 2048,
// tied), one rank, f32: forward = products / GEMM rate + causal attention / attention rate +
// elementwise bytes / bandwidth; the backward twice each; the per-stage activations in the report.
TEST(TrainingEstimate, StepTimeFromMeasuredKernelRatesByHand) {
  const ModelConfig c = resolve_model("small");
  ClusterOptions co;
  co.gpu = "cpu";
  co.gpus = 1;
  ClusterSpec cl = build_cluster(co);
  PlanOptions o;
  o.mem_bw = 1e10;
  o.training_rates = {1e10, 5e9, 1e9, 2e9};
  TrainingWorkload w;
  w.global_batch = 2;
  w.micro_batch = 1;
  w.seq_len = 128;
  w.recompute = Recompute::None;
  w.precision = Precision::FP32;
  const LayoutEstimate e = estimate_training(c, cl, {1, 1, 1, 1}, w, o);
  // Products per token: 4 layers x (q, o 256 x 256; k, v 256 x 128; gate, up, down 256 x 688)
  // and the LM head 2048 x 256: 3,424,256 multiply-adds.
  const double linear = 2.0 * 128 * 3424256;
  const double attn = 2.0 * 128 * 128 * 256 * 4;  // causal: 2 s^2 q_dim per sequence and layer
  // Elementwise values per token: 4 x (10 x 256 + 2 x (256 + 2 x 128) + 3 x 688) + 3 x 2048 + 256.
  const double elem = 128.0 * 28992 * 4 / 1e10;
  const double fwd = linear / 1e10 + attn / 1e9 + elem;
  const double bwd = 2 * linear / 5e9 + 2 * attn / 2e9 + 2 * elem;
  EXPECT_NEAR(e.forward_time, fwd, 1e-12);
  EXPECT_NEAR(e.backward_time, bwd, 1e-12);
  // Two micro-batches, then Adam over the f32 parameters: 36 bytes each at the bandwidth.
  const double params = double(c.param_count());
  EXPECT_NEAR(e.step_time, 2 * (fwd + bwd) + params * 36 / 1e10, 1e-9);
  ASSERT_EQ(e.stage_activations.size(), 1u);
  ActivationShape a;
  a.seq_len = 128;
  a.layers = 4;
  a.head = true;
  EXPECT_DOUBLE_EQ(e.stage_activations[0].peak_bytes, double(activation_bytes_per_chunk(c, a)));
  EXPECT_EQ(e.stage_activations[0].peak_states, 1);
  // The LM head's products at their own rate: 2048 x 256 of the 3,424,256 multiply-adds a token.
  o.training_rates.head_forward = 4e10;
  o.training_rates.head_backward = 2e10;
  const LayoutEstimate h = estimate_training(c, cl, {1, 1, 1, 1}, w, o);
  const double head = 2.0 * 128 * 2048 * 256, layers = linear - head;
  EXPECT_NEAR(h.forward_time, layers / 1e10 + head / 4e10 + attn / 1e9 + elem, 1e-12);
  EXPECT_NEAR(h.backward_time, 2 * layers / 5e9 + 2 * head / 2e10 + 2 * attn / 2e9 + 2 * elem,
              1e-12);
  // --flops replaces the measured rates for every product.
  o.flops = 2e10;
  const LayoutEstimate g = estimate_training(c, cl, {1, 1, 1, 1}, w, o);
  EXPECT_NEAR(g.forward_time, (linear + attn) / 2e10 + elem, 1e-12);
}

}  // namespace
}  // namespace parallm::plan

namespace parallm::plan {
namespace {

TEST(ActivationBytes, WhatZeroBubbleKeepsForWByHand) {
  ModelConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 10;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 2;
  c.vocab_size = 11;
  ActivationShape a;
  a.micro_batch = 2;
  a.seq_len = 3;
  a.layers = 1;
  // xn1, xn2 2 x 6 x 8 = 96; attn 6 x 8, h 6 x 10, dQKV 6 x 16, dgate|up 6 x 20, two output
  // gradients 2 x 6 x 8: 6 x 70 = 420. 516 floats, whatever the recompute.
  EXPECT_EQ(weight_grad_bytes_per_chunk(c, a, false), 516 * 4);
  a.recompute = 2;
  EXPECT_EQ(weight_grad_bytes_per_chunk(c, a, false), 516 * 4);
  // The head: xf 6 x 8 and dlogits 6 x 11; the embedding's output gradient 6 x 8.
  a.head = true;
  EXPECT_EQ(weight_grad_bytes_per_chunk(c, a, true), (516 + 114 + 48) * 4);
  // TP 4 rank 1 with SP: 2 token rows; qd 2, kvd 2, f 3, vocabulary 3:
  // 2 x 2 x 8 + 6 x (4 + 4 + 9 + 16) = 32 + 198 = 230; head 2 x 8 + 18 = 34; embedding 16.
  a.tp = 4;
  a.tp_rank = 1;
  a.sequence_parallel = true;
  EXPECT_EQ(weight_grad_bytes_per_chunk(c, a, true), (230 + 34 + 16) * 4);
}

}  // namespace
}  // namespace parallm::plan

namespace parallm::plan {
namespace {

TEST(ActivationBytes, ShapesBeyondInt64AreRefusedByName) {
  const ModelConfig c = resolve_model("llama-2-70b");
  ActivationShape a;
  a.micro_batch = 1 << 20;
  a.seq_len = 1 << 24;
  a.layers = 80;
  try {
    activation_bytes_per_chunk(c, a);
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("9e18 bytes"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace parallm::plan

namespace parallm::plan {
namespace {

// ZB-H1 in the planner: W fills the bubble (a smaller bubble and step than 1F1B's at the same
// stage times), and the later stages hold more: their states wait for W.
TEST(TrainingEstimate, ZeroBubbleTradesTheBubbleForMemory) {
  const ModelConfig c = resolve_model("bench-30m");
  ClusterOptions co;
  co.gpu = "cpu";
  co.gpus = 2;
  const ClusterSpec cl = build_cluster(co);
  PlanOptions o;
  o.mem_bw = 1e10;
  o.flops = 2e10;
  TrainingWorkload w;
  w.global_batch = 16;
  w.micro_batch = 4;
  w.seq_len = 256;
  w.recompute = Recompute::None;
  w.precision = Precision::FP32;
  const LayoutEstimate one = estimate_training(c, cl, {1, 2, 1, 1}, w, o);
  w.schedule = pipeline::ScheduleKind::ZeroBubbleH1;
  const LayoutEstimate zb = estimate_training(c, cl, {1, 2, 1, 1}, w, o);
  EXPECT_LT(zb.bubble_fraction, one.bubble_fraction);
  EXPECT_LT(zb.step_time, one.step_time);
  EXPECT_DOUBLE_EQ(zb.stage_activations[0].peak_bytes, one.stage_activations[0].peak_bytes);
  EXPECT_EQ(one.stage_activations[1].peak_states, 1);
  EXPECT_EQ(zb.stage_activations[1].peak_states, 2);
  EXPECT_GT(zb.stage_activations[1].peak_bytes, one.stage_activations[1].peak_bytes);
  // The W the simulator ran is the weight-gradient half of the backward's products.
  EXPECT_GT(zb.stage_weight_time[1], 0.3 * zb.stage_backward_time[1]);
  EXPECT_LT(zb.stage_weight_time[1], 0.5 * zb.stage_backward_time[1]);
}

}  // namespace
}  // namespace parallm::plan
