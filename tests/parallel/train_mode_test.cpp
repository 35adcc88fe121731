// The layers' training modes (parallel::TrainMode) against the plain training path at TP 1, 2, 3
// on threads:
// - defer_weight_grads (ZB-H1's B/W split): backward() then backward_weight() gives bit for bit
//   the input and weight gradients of the combined backward(), with K/V heads split and
//   replicated (TP > KV heads), every scratch field of the cache clobbered between the calls and
//   the fields that are free after B (q, k, v, probs, gu) clobbered before W;
// - recompute_probs: the softmax is not kept (probs empty) and the gradients are bit for bit those
//   of the kept softmax;
// - sequence_parallel: at TP 2 and 3 with token counts TP does not divide, every layer's output
//   rows and input gradient equal the non-SP layer's rows of this rank within 1e-6 relative, and
//   its weight gradients too (attention, MLP, embedding, LM head); SP with the split backward is
//   bit for bit SP's combined backward; the LM head's backward_input/backward_weight are bit for
//   bit its backward().
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "parallel/layer_test_util.h"
#include "parallm/parallel/attention.h"
#include "parallm/parallel/embedding.h"
#include "parallm/parallel/lm_head.h"
#include "parallm/parallel/mappings.h"
#include "parallm/parallel/mlp.h"
#include "parallm/parallel/train_mode.h"

namespace parallm::parallel {
namespace {

using testing::random_floats;
using testing::random_matrix;
using testing::rel_error;
using testing::run_tp;

constexpr double kSpTol = 1e-6;

std::vector<float> rows_of(const std::vector<float>& m, int64_t cols, const ShardSpec& s) {
  return {m.begin() + s.begin * cols, m.begin() + s.end * cols};
}

// A vector of garbage of a different size: a field the layer must not read across calls.
void clobber(std::vector<float>& v) {
  v.assign(v.size() + 3, std::numeric_limits<float>::quiet_NaN());
}
void clobber(std::vector<int32_t>& v) { v.assign(v.size() + 3, -77); }

void clobber_scratch(AttentionCache& c) {
  clobber(c.qkv), clobber(c.xg), clobber(c.dout), clobber(c.seq);
  clobber(c.dattn), clobber(c.dq), clobber(c.dk), clobber(c.dv), clobber(c.positions);
}
void clobber_scratch(MlpCache& c) {
  clobber(c.dh), clobber(c.dgu), clobber(c.xg), clobber(c.dout), clobber(c.seq);
}

// ---- attention

struct AttnShape {
  int64_t q_heads, kv_heads, head_dim, hidden;
};

struct AttnWeights {
  Tensor q, k, v, o;
};

AttnWeights attn_weights(const AttnShape& s) {
  return {random_matrix(s.q_heads * s.head_dim, s.hidden, 21),
          random_matrix(s.kv_heads * s.head_dim, s.hidden, 22),
          random_matrix(s.kv_heads * s.head_dim, s.hidden, 23),
          random_matrix(s.hidden, s.q_heads * s.head_dim, 24)};
}

ParallelAttention attn_layer(const AttnShape& s, const AttnWeights& w, comm::Group g) {
  const HeadPlan heads = HeadPlan::make(s.q_heads, s.kv_heads, g.size(), g.rank());
  RopeSpec rope;
  for (int64_t i = 0; i < s.head_dim / 2; ++i)
    rope.inv_freq.push_back(std::pow(10000.0f, -2.0f * i / s.head_dim));
  const FusedShardSpec spec = ParallelAttention::qkv_spec(heads, s.head_dim);
  const Tensor qkv = testing::fused_rows(spec, [&](const std::string& name) -> const Tensor& {
    return name == "q_proj" ? w.q : name == "k_proj" ? w.k : w.v;
  });
  return ParallelAttention(qkv, testing::cols_of(w.o, ParallelAttention::o_spec(heads, s.head_dim)),
                           heads, s.head_dim, std::move(rope), g);
}

// One forward + backward of a layer: the output, the input gradient and the weight gradients
// (which start from a nonzero value, as under gradient accumulation).
struct Grads {
  std::vector<float> out, dxn, dw1, dw2;
};

// mode.defer_weight_grads: backward() then backward_weight(), with scratch and the fields free
// after B clobbered in between. Under SP xn / dout are this rank's rows.
Grads run_attention(const ParallelAttention& layer, const std::vector<float>& xn,
                    const std::vector<float>& dout, int64_t B, int64_t S, const TrainMode& mode) {
  const int64_t H = layer.qkv().weight().dim(1);
  const int64_t rows = static_cast<int64_t>(xn.size()) / H;
  Grads g;
  g.out.assign(rows * H, 5.0f);
  g.dxn.assign(rows * H, 5.0f);
  g.dw1 = random_floats(layer.qkv().weight().numel(), 91, 0.1f);
  g.dw2 = random_floats(layer.o().weight().numel(), 92, 0.1f);
  AttentionCache c;
  layer.forward_train(xn.data(), B, S, c, g.out.data(), mode);
  if (mode.recompute_probs) {
    EXPECT_EQ(c.probs.size(), 0u) << "recompute_probs keeps no softmax";
  } else {
    EXPECT_EQ(static_cast<int64_t>(c.probs.size()), B * layer.heads().q_heads * S * S);
  }
  clobber_scratch(c);
  if (!mode.defer_weight_grads) {
    layer.backward(xn.data(), c, dout.data(), B, S, g.dxn.data(), g.dw1.data(), g.dw2.data(),
                   mode);
    return g;
  }
  const std::vector<float> w1 = g.dw1, w2 = g.dw2;
  layer.backward(xn.data(), c, dout.data(), B, S, g.dxn.data(), g.dw1.data(), g.dw2.data(), mode);
  EXPECT_EQ(g.dw1, w1) << "a deferred backward leaves the weight gradients alone";
  EXPECT_EQ(g.dw2, w2);
  clobber_scratch(c);
  clobber(c.q), clobber(c.k), clobber(c.v), clobber(c.probs);
  layer.backward_weight(xn.data(), c, B, S, g.dw1.data(), g.dw2.data(), mode);
  EXPECT_TRUE(c.wgrad_dqkv.empty() && c.wgrad_dout.empty()) << "W consumes what B kept";
  return g;
}

void expect_same(const Grads& a, const Grads& b, const std::string& tag) {
  EXPECT_EQ(a.out, b.out) << tag << " out";
  EXPECT_EQ(a.dxn, b.dxn) << tag << " dxn";
  EXPECT_EQ(a.dw1, b.dw1) << tag << " first weight's gradient";
  EXPECT_EQ(a.dw2, b.dw2) << tag << " second weight's gradient";
}

// The modes without SP, each against the plain path, bit for bit.
TEST(TrainMode, AttentionDeferredAndRecomputedAreBitForBit) {
  struct Case {
    AttnShape shape;
    std::vector<int> tps;
  };
  // 6 query heads over 1 KV head: replicated at TP 2 and 3; over 3: split at TP 3.
  const Case cases[] = {{{6, 1, 4, 12}, {1, 2, 3}}, {{6, 3, 4, 12}, {1, 3}}, {{4, 2, 4, 8}, {2}}};
  const int64_t B = 2, S = 5, T = B * S;
  for (const Case& cs : cases) {
    const AttnWeights w = attn_weights(cs.shape);
    const std::vector<float> xn = random_floats(T * cs.shape.hidden, 31);
    const std::vector<float> dout = random_floats(T * cs.shape.hidden, 32);
    for (int tp : cs.tps) {
      run_tp(tp, [&](comm::Group g) {
        const ParallelAttention layer = attn_layer(cs.shape, w, g);
        const std::string tag = "q" + std::to_string(cs.shape.q_heads) + " kv" +
                                std::to_string(cs.shape.kv_heads) + " tp " + std::to_string(tp) +
                                " rank " + std::to_string(g.rank());
        const Grads plain = run_attention(layer, xn, dout, B, S, {});
        const Grads split = run_attention(layer, xn, dout, B, S, {false, false, true});
        const Grads recompute = run_attention(layer, xn, dout, B, S, {false, true, false});
        const Grads both = run_attention(layer, xn, dout, B, S, {false, true, true});
        expect_same(split, plain, tag + " defer_weight_grads");
        expect_same(recompute, plain, tag + " recompute_probs");
        expect_same(both, plain, tag + " both");
      });
    }
  }
}

TEST(TrainMode, AttentionSequenceParallelMatchesReplicated) {
  const AttnShape shape{6, 1, 4, 12};  // K/V replicated at TP 2 and 3
  struct Sizes {
    int64_t B, S;
  };
  for (const Sizes z : {Sizes{1, 7}, Sizes{2, 5}}) {  // 7 and 10 tokens: uneven at TP 2 or 3
    const int64_t T = z.B * z.S, H = shape.hidden;
    const AttnWeights w = attn_weights(shape);
    const std::vector<float> xn = random_floats(T * H, 41);
    const std::vector<float> dout = random_floats(T * H, 42);
    for (int tp : {2, 3}) {
      run_tp(tp, [&](comm::Group g) {
        const ParallelAttention layer = attn_layer(shape, w, g);
        const std::string tag =
            "T " + std::to_string(T) + " tp " + std::to_string(tp) + " rank " +
            std::to_string(g.rank());
        const ShardSpec mine = shard_of(T, g);
        const std::vector<float> x_sp = rows_of(xn, H, mine), d_sp = rows_of(dout, H, mine);
        const Grads plain = run_attention(layer, xn, dout, z.B, z.S, {});
        const Grads sp = run_attention(layer, x_sp, d_sp, z.B, z.S, {true, false, false});
        EXPECT_LT(rel_error(sp.out, rows_of(plain.out, H, mine)), kSpTol) << tag << " out";
        EXPECT_LT(rel_error(sp.dxn, rows_of(plain.dxn, H, mine)), kSpTol) << tag << " dxn";
        EXPECT_LT(rel_error(sp.dw1, plain.dw1), kSpTol) << tag << " dqkv";
        EXPECT_LT(rel_error(sp.dw2, plain.dw2), kSpTol) << tag << " d_o";
        // SP with the other modes: bit for bit SP alone.
        expect_same(run_attention(layer, x_sp, d_sp, z.B, z.S, {true, false, true}), sp,
                    tag + " SP + defer");
        expect_same(run_attention(layer, x_sp, d_sp, z.B, z.S, {true, true, true}), sp,
                    tag + " SP + defer + recompute");
      });
    }
  }
}

TEST(TrainMode, AttentionRejectsMismatchedModes) {
  const AttnShape shape{2, 1, 4, 8};
  const AttnWeights w = attn_weights(shape);
  run_tp(1, [&](comm::Group g) {
    const ParallelAttention layer = attn_layer(shape, w, g);
    const std::vector<float> x = random_floats(3 * 8, 1), d = random_floats(3 * 8, 2);
    std::vector<float> out(3 * 8), dx(3 * 8), dw1(layer.qkv().weight().numel()),
        dw2(layer.o().weight().numel());
    AttentionCache c;
    layer.forward_train(x.data(), 1, 3, c, out.data(), {false, true, false});
    // Probs were not kept: a backward told they were must say so, not read an empty buffer.
    EXPECT_THROW(layer.backward(x.data(), c, d.data(), 1, 3, dx.data(), dw1.data(), dw2.data()),
                 std::invalid_argument);
    // W without a deferred B.
    EXPECT_THROW(layer.backward_weight(x.data(), c, 1, 3, dw1.data(), dw2.data()),
                 std::invalid_argument);
  });
}

// ---- MLP

struct MlpWeights {
  Tensor gate, up, down;
};

ParallelMlp mlp_layer(const MlpWeights& w, comm::Group g) {
  const ShardSpec ffn = shard_of(w.gate.dim(0), g);
  const FusedShardSpec spec = ParallelMlp::gate_up_spec(ffn);
  const Tensor gu = testing::fused_rows(spec, [&](const std::string& name) -> const Tensor& {
    return name == "gate_proj" ? w.gate : w.up;
  });
  return ParallelMlp(gu, testing::cols_of(w.down, ffn), ffn, g);
}

Grads run_mlp(const ParallelMlp& layer, const std::vector<float>& xn,
              const std::vector<float>& dout, int64_t T, const TrainMode& mode) {
  const int64_t H = layer.gate_up().weight().dim(1);
  const int64_t rows = static_cast<int64_t>(xn.size()) / H;
  Grads g;
  g.out.assign(rows * H, 5.0f);
  g.dxn.assign(rows * H, 5.0f);
  g.dw1 = random_floats(layer.gate_up().weight().numel(), 93, 0.1f);
  g.dw2 = random_floats(layer.down().weight().numel(), 94, 0.1f);
  MlpCache c;
  layer.forward_train(xn.data(), T, c, g.out.data(), mode);
  clobber_scratch(c);
  if (!mode.defer_weight_grads) {
    layer.backward(xn.data(), c, dout.data(), T, g.dxn.data(), g.dw1.data(), g.dw2.data(), mode);
    return g;
  }
  const std::vector<float> w1 = g.dw1, w2 = g.dw2;
  layer.backward(xn.data(), c, dout.data(), T, g.dxn.data(), g.dw1.data(), g.dw2.data(), mode);
  EXPECT_EQ(g.dw1, w1) << "a deferred backward leaves the weight gradients alone";
  EXPECT_EQ(g.dw2, w2);
  clobber_scratch(c);
  clobber(c.gu);
  layer.backward_weight(xn.data(), c, T, g.dw1.data(), g.dw2.data(), mode);
  EXPECT_TRUE(c.wgrad_dgu.empty() && c.wgrad_dout.empty()) << "W consumes what B kept";
  return g;
}

TEST(TrainMode, MlpDeferredAndSequenceParallel) {
  const int64_t H = 12, F = 10;  // FFN 10: uneven at TP 3
  const MlpWeights w{random_matrix(F, H, 51), random_matrix(F, H, 52), random_matrix(H, F, 53)};
  for (int64_t T : {7, 10}) {
    const std::vector<float> xn = random_floats(T * H, 54), dout = random_floats(T * H, 55);
    for (int tp : {1, 2, 3}) {
      run_tp(tp, [&](comm::Group g) {
        const ParallelMlp layer = mlp_layer(w, g);
        const std::string tag = "T " + std::to_string(T) + " tp " + std::to_string(tp) +
                                " rank " + std::to_string(g.rank());
        const Grads plain = run_mlp(layer, xn, dout, T, {});
        expect_same(run_mlp(layer, xn, dout, T, {false, false, true}), plain, tag + " defer");
        const ShardSpec mine = shard_of(T, g);
        const std::vector<float> x_sp = rows_of(xn, H, mine), d_sp = rows_of(dout, H, mine);
        const Grads sp = run_mlp(layer, x_sp, d_sp, T, {true, false, false});
        EXPECT_LT(rel_error(sp.out, rows_of(plain.out, H, mine)), kSpTol) << tag << " out";
        EXPECT_LT(rel_error(sp.dxn, rows_of(plain.dxn, H, mine)), kSpTol) << tag << " dxn";
        EXPECT_LT(rel_error(sp.dw1, plain.dw1), kSpTol) << tag << " dgate_up";
        EXPECT_LT(rel_error(sp.dw2, plain.dw2), kSpTol) << tag << " ddown";
        expect_same(run_mlp(layer, x_sp, d_sp, T, {true, false, true}), sp, tag + " SP + defer");
      });
    }
  }
}

// ---- embedding and LM head

TEST(TrainMode, EmbeddingAndHeadSequenceParallel) {
  const int64_t V = 11, H = 8;  // vocabulary 11: uneven at TP 2 and 3
  const Tensor table = random_matrix(V, H, 61);
  for (int64_t T : {7, 10}) {
    std::vector<int32_t> ids(T);
    for (int64_t t = 0; t < T; ++t) ids[t] = static_cast<int32_t>((t * 5 + 3) % V);
    const std::vector<float> dx = random_floats(T * H, 62), xf = random_floats(T * H, 63);
    for (int tp : {2, 3}) {
      run_tp(tp, [&](comm::Group g) {
        const std::string tag = "T " + std::to_string(T) + " tp " + std::to_string(tp) +
                                " rank " + std::to_string(g.rank());
        const ShardSpec vocab = shard_of(V, g), mine = shard_of(T, g);
        const Tensor shard = testing::rows_of(table, vocab);
        std::vector<float> scratch;  // one buffer lent to every SP call

        const VocabParallelEmbedding emb(shard, vocab, g);
        std::vector<float> x(T * H), x_sp(mine.size() * H, 9.0f);
        emb.forward(ids.data(), T, x.data());
        emb.forward(ids.data(), T, x_sp.data(), true, &scratch);
        EXPECT_LT(rel_error(x_sp, rows_of(x, H, mine)), kSpTol) << tag << " embedding rows";
        std::vector<float> dt(shard.numel(), 0.5f), dt_sp(shard.numel(), 0.5f);
        emb.backward(ids.data(), T, dx.data(), dt.data());
        const std::vector<float> dx_sp = rows_of(dx, H, mine);
        emb.backward(ids.data(), T, dx_sp.data(), dt_sp.data(), true, &scratch);
        EXPECT_LT(rel_error(dt_sp, dt), kSpTol) << tag << " embedding gradient";

        const VocabParallelLmHead head(shard, vocab, g);
        std::vector<float> logits(T * vocab.size()), logits_sp(T * vocab.size(), 9.0f);
        head.forward(xf.data(), T, logits.data());
        const std::vector<float> xf_sp = rows_of(xf, H, mine);
        head.forward(xf_sp.data(), T, logits_sp.data(), true, &scratch);
        EXPECT_LT(rel_error(logits_sp, logits), kSpTol) << tag << " logits";
        const std::vector<float> dl = random_floats(T * vocab.size(), 64 + g.rank());
        std::vector<float> dxf(T * H), dxf_sp(mine.size() * H, 9.0f);
        std::vector<float> dw(shard.numel(), 0.25f), dw_sp(shard.numel(), 0.25f);
        head.backward(xf.data(), dl.data(), T, dxf.data(), dw.data());
        head.backward(xf_sp.data(), dl.data(), T, dxf_sp.data(), dw_sp.data(), true, &scratch);
        EXPECT_LT(rel_error(dxf_sp, rows_of(dxf, H, mine)), kSpTol) << tag << " head dx";
        EXPECT_LT(rel_error(dw_sp, dw), kSpTol) << tag << " head dw";
        // The head's B/W split: bit for bit the combined backward, with and without SP.
        std::vector<float> dxf_b(T * H), dw_w(shard.numel(), 0.25f);
        head.backward_weight(xf.data(), dl.data(), T, dw_w.data());
        head.backward_input(dl.data(), T, dxf_b.data());
        EXPECT_EQ(dxf_b, dxf) << tag << " head backward_input";
        EXPECT_EQ(dw_w, dw) << tag << " head backward_weight";
        std::vector<float> dxf_b_sp(mine.size() * H), dw_w_sp(shard.numel(), 0.25f);
        head.backward_weight(xf_sp.data(), dl.data(), T, dw_w_sp.data(), true, &scratch);
        head.backward_input(dl.data(), T, dxf_b_sp.data(), true, &scratch);
        EXPECT_EQ(dxf_b_sp, dxf_sp) << tag << " head backward_input under SP";
        EXPECT_EQ(dw_w_sp, dw_sp) << tag << " head backward_weight under SP";
      });
    }
  }
}

}  // namespace
}  // namespace parallm::parallel
