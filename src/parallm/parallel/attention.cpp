#include "parallm/parallel/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/kernels/attention.h"
#include "parallm/kernels/backward.h"
#include "parallm/parallel/mappings.h"

namespace parallm::parallel {

FusedShardSpec ParallelAttention::qkv_spec(const HeadPlan& heads, int64_t head_dim) {
  return {{{"q_proj", heads.q_rows(head_dim), 1},
           {"k_proj", heads.kv_rows(head_dim), heads.kv_replicas},
           {"v_proj", heads.kv_rows(head_dim), heads.kv_replicas}}};
}

int64_t ParallelAttention::scratch_floats(const HeadPlan& heads, int64_t head_dim, int64_t T) {
  const int64_t qd = heads.q_heads * head_dim, kvd = heads.kv_heads * head_dim;
  // qkv [T, qd + 2 kvd]; q [T, qd]; k, v [T, kvd]; attn [T, qd]
  return T * (qd + 2 * kvd) + T * qd + 2 * T * kvd + T * qd;
}

ParallelAttention::ParallelAttention(RowBlocks qkv, Tensor o, const HeadPlan& heads,
                                     int64_t head_dim, RopeSpec rope, comm::Group group,
                                     std::vector<float> qkv_bias)
    : heads_(heads),
      head_dim_(head_dim),
      rope_(std::move(rope)),
      group_(std::move(group)),
      qkv_bias_(std::move(qkv_bias)) {
  if (heads_.q_heads <= 0 || heads_.kv_heads <= 0 || heads_.q_heads % heads_.kv_heads != 0)
    fail("attention", "rank's heads: ", heads_.q_heads, " query heads over ", heads_.kv_heads,
         " KV heads (need a positive multiple)");
  if (static_cast<int64_t>(rope_.inv_freq.size()) * 2 != head_dim_)
    fail("attention", "RoPE has ", rope_.inv_freq.size(), " frequencies for head_dim ", head_dim_);
  qkv_ = ColumnParallelLinear(std::move(qkv), qkv_spec(heads_, head_dim_), group_);
  o_ = RowParallelLinear(std::move(o), o_spec(heads_, head_dim_), group_);
  if (o_.weight().dim(0) != qkv_.in_features())
    fail("attention", "o_proj shard ", o_.weight().describe(), " does not map back to hidden ",
         qkv_.in_features());
  if (!qkv_bias_.empty() && static_cast<int64_t>(qkv_bias_.size()) != qkv_.out_features())
    fail("attention", "q/k/v bias of ", qkv_bias_.size(), " rows for a fused Q/K/V shard of ",
         qkv_.out_features(), " rows");
}

void ParallelAttention::forward(const float* xn, const std::vector<SeqChunk>& chunks,
                                const int32_t* positions, KvStore& kv, int64_t layer,
                                float* scratch, float* out) const {
  const int64_t hd = head_dim_;
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd;
  const int64_t bs = kv.block_size();
  int64_t T = 0;
  for (const SeqChunk& ch : chunks) {
    const int64_t cap = bs > 0 ? kv.table_blocks(ch.slot) * bs : kv.capacity();
    if (ch.n_tokens < 0 || ch.start_pos < 0 || ch.start_pos + ch.n_tokens > cap)
      fail("attention", "sequence ", ch.slot, ": positions [", ch.start_pos, ", ",
           ch.start_pos + ch.n_tokens, ") exceed the KV cache's ", cap, " positions",
           bs > 0 ? " (its block table)" : "");
    T += ch.n_tokens;
  }
  if (T == 0) return;
  float* qkv = scratch;
  float* q = qkv + T * (qd + 2 * kvd);
  float* k = q + T * qd;
  float* v = k + T * kvd;
  float* attn = v + T * kvd;

  qkv_.forward(xn, T, qkv);  // [T, qd + 2 kvd]: each row q | k | v
  if (!qkv_bias_.empty()) {  // before RoPE, as Qwen2's q_proj/k_proj/v_proj biases
    const int64_t w = qd + 2 * kvd;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < w; ++j) qkv[t * w + j] += qkv_bias_[j];
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* row = qkv + t * (qd + 2 * kvd);
    std::memcpy(q + t * qd, row, qd * sizeof(float));
    std::memcpy(k + t * kvd, row + qd, kvd * sizeof(float));
    std::memcpy(v + t * kvd, row + qd + kvd, kvd * sizeof(float));
  }
  kernels::rope(q, T, heads_.q_heads, hd, positions, rope_.inv_freq.data(), rope_.style);
  kernels::rope(k, T, heads_.kv_heads, hd, positions, rope_.inv_freq.data(), rope_.style);

  const kernels::AttentionShape shape{heads_.q_heads, heads_.kv_heads, hd, kv.kv_stride()};
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t off = 0;
  for (const SeqChunk& ch : chunks) {
    float* kc = kv.keys(layer, ch.slot);
    float* vc = kv.values(layer, ch.slot);
    if (bs > 0) {
      // Paged: each position's row through the slot's block table, then attention through it.
      const int32_t* table = kv.block_table(ch.slot);
      for (int64_t i = 0; i < ch.n_tokens; ++i) {
        const int64_t p = ch.start_pos + i;
        const int64_t row = static_cast<int64_t>(table[p / bs]) * bs + p % bs;
        std::memcpy(kc + row * kv.kv_stride(), k + (off + i) * kvd, kvd * sizeof(float));
        std::memcpy(vc + row * kv.kv_stride(), v + (off + i) * kvd, kvd * sizeof(float));
      }
      kernels::attention_paged(q + off * qd, {kc, vc, table, bs}, attn + off * qd, ch.n_tokens,
                               ch.start_pos, shape, scale);
      off += ch.n_tokens;
      continue;
    }
    for (int64_t i = 0; i < ch.n_tokens; ++i) {
      std::memcpy(kc + (ch.start_pos + i) * kv.kv_stride(), k + (off + i) * kvd,
                  kvd * sizeof(float));
      std::memcpy(vc + (ch.start_pos + i) * kv.kv_stride(), v + (off + i) * kvd,
                  kvd * sizeof(float));
    }
    kernels::attention(q + off * qd, kc, vc, attn + off * qd, ch.n_tokens, ch.start_pos, shape,
                       scale);
    off += ch.n_tokens;
  }
  o_.forward(attn, T, out);  // partial sums over this rank's heads, all-reduced
}

namespace {

void resize(std::vector<float>& v, int64_t n) { v.resize(static_cast<size_t>(n)); }

}  // namespace

void ParallelAttention::forward_train(const float* xn, int64_t B, int64_t S, AttentionCache& c,
                                      float* out, const TrainMode& mode) const {
  const int64_t hd = head_dim_, T = B * S, H = qkv_.in_features();
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd, w = qd + 2 * kvd;
  // On one rank the sequence split is the whole: the plain path is the same arithmetic.
  const bool sp = mode.sequence_parallel && group_.size() > 1;
  if (!qkv_bias_.empty())
    fail("attention", "training a layer with q/k/v biases (Qwen2) is not supported");
  resize(c.qkv, T * w);
  resize(c.q, T * qd);
  resize(c.k, T * kvd);
  resize(c.v, T * kvd);
  if (mode.recompute_probs) {
    std::vector<float>().swap(c.probs);  // not kept: release what an earlier mode held
  } else {
    resize(c.probs, B * heads_.q_heads * S * S);
  }
  resize(c.attn, T * qd);
  c.positions.resize(static_cast<size_t>(T));
  if (T == 0) return;
  for (int64_t t = 0; t < T; ++t) c.positions[t] = static_cast<int32_t>(t % S);
  const float* x = xn;
  float* seq = nullptr;
  if (sp) {
    // gather_from_sequence: every rank needs all T rows for the Q/K/V GEMM; not kept.
    resize(c.xg, T * H);
    seq = sequence_scratch(c.seq, T, H, group_);
    gather_from_sequence_forward(group_, xn, T, H, c.xg.data(), seq);
    x = c.xg.data();
  }
  qkv_.forward(x, T, c.qkv.data());  // each row q | k | v
  for (int64_t t = 0; t < T; ++t) {
    const float* row = c.qkv.data() + t * w;
    std::memcpy(c.q.data() + t * qd, row, qd * sizeof(float));
    std::memcpy(c.k.data() + t * kvd, row + qd, kvd * sizeof(float));
    std::memcpy(c.v.data() + t * kvd, row + qd + kvd, kvd * sizeof(float));
  }
  const float* inv = rope_.inv_freq.data();
  kernels::rope(c.q.data(), T, heads_.q_heads, hd, c.positions.data(), inv, rope_.style);
  kernels::rope(c.k.data(), T, heads_.kv_heads, hd, c.positions.data(), inv, rope_.style);
  kernels::attention_forward(c.q.data(), c.k.data(), c.v.data(), B, S, heads_.q_heads,
                             heads_.kv_heads, hd, c.attn.data(),
                             mode.recompute_probs ? nullptr : c.probs.data());
  if (sp) {
    // Partial sums over this rank's heads (xg is free again), reduce-scattered to this rank's rows.
    o_.forward(c.attn.data(), T, c.xg.data(), /*reduce=*/false);
    reduce_scatter_to_sequence_forward(group_, c.xg.data(), T, H, out, seq);
  } else {
    o_.forward(c.attn.data(), T, out);  // partial sums over this rank's heads, all-reduced
  }
}

void ParallelAttention::backward(const float* xn, AttentionCache& c, const float* dout, int64_t B,
                                 int64_t S, float* dxn, float* dqkv, float* d_o,
                                 const TrainMode& mode) const {
  const int64_t hd = head_dim_, T = B * S, H = qkv_.in_features();
  if (T == 0) return;
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd, w = qd + 2 * kvd;
  const bool sp = mode.sequence_parallel && group_.size() > 1;
  const bool defer = mode.defer_weight_grads;
  if (static_cast<int64_t>(c.q.size()) != T * qd || static_cast<int64_t>(c.attn.size()) != T * qd)
    fail("attention", "backward of ", B, " x ", S, " tokens without its forward_train (the cache "
         "holds q for ", c.q.size() / std::max<int64_t>(qd, 1), " tokens)");
  const float* probs = nullptr;
  if (!mode.recompute_probs) {
    if (static_cast<int64_t>(c.probs.size()) != B * heads_.q_heads * S * S)
      fail("attention", "backward without recompute_probs, but the forward kept ", c.probs.size(),
           " softmax floats, not ", B * heads_.q_heads * S * S,
           " (was forward_train run with recompute_probs?)");
    probs = c.probs.data();
  }
  resize(c.dattn, T * qd);
  resize(c.dq, T * qd);
  resize(c.dk, T * kvd);
  resize(c.dv, T * kvd);
  c.positions.resize(static_cast<size_t>(T));  // scratch: filled again, it may have been lent
  for (int64_t t = 0; t < T; ++t) c.positions[t] = static_cast<int32_t>(t % S);
  float* seq = sp ? sequence_scratch(c.seq, T, H, group_) : nullptr;

  // The output's gradient on all T rows, kept for backward_weight() when deferring.
  const float* g_out =
      output_grad_on_all_rows(group_, dout, T, H, sp, defer, defer ? c.wgrad_dout : c.dout, seq);
  if (!defer && d_o != nullptr) o_.backward_weight(c.attn.data(), g_out, T, d_o);
  o_.backward_input(g_out, T, c.dattn.data());  // no communication
  kernels::attention_backward(c.q.data(), c.k.data(), c.v.data(), probs, c.dattn.data(), B, S,
                              heads_.q_heads, heads_.kv_heads, hd, c.dq.data(), c.dk.data(),
                              c.dv.data());
  const float* inv = rope_.inv_freq.data();
  kernels::rope_backward(c.dq.data(), T, heads_.q_heads, hd, c.positions.data(), inv, rope_.style);
  kernels::rope_backward(c.dk.data(), T, heads_.kv_heads, hd, c.positions.data(), inv, rope_.style);
  std::vector<float>& gbuf = defer ? c.wgrad_dqkv : c.qkv;  // dqkv [T, w]
  resize(gbuf, T * w);
  float* g = gbuf.data();
  for (int64_t t = 0; t < T; ++t) {
    float* row = g + t * w;
    std::memcpy(row, c.dq.data() + t * qd, qd * sizeof(float));
    std::memcpy(row + qd, c.dk.data() + t * kvd, kvd * sizeof(float));
    std::memcpy(row + qd + kvd, c.dv.data() + t * kvd, kvd * sizeof(float));
  }
  if (!defer && dqkv != nullptr) {
    const float* x = xn;
    if (sp) {  // the input again on all rows (the forward did not keep it)
      resize(c.xg, T * H);
      gather_from_sequence_forward(group_, xn, T, H, c.xg.data(), seq);
      x = c.xg.data();
    }
    qkv_.backward_weight(x, g, T, dqkv);  // sums the replicated K/V rows' gradient
  }
  if (dxn != nullptr) {
    if (sp) {
      // Partial input gradient on all rows, reduce-scattered to this rank's rows.
      resize(c.xg, T * H);
      qkv_.backward_input(g, T, c.xg.data(), /*reduce=*/false);
      gather_from_sequence_backward(group_, c.xg.data(), T, H, dxn, seq);
    } else {
      qkv_.backward_input(g, T, dxn);  // all-reduced
    }
  }
}

void ParallelAttention::backward_weight(const float* xn, AttentionCache& c, int64_t B, int64_t S,
                                        float* dqkv, float* d_o, const TrainMode& mode) const {
  const int64_t hd = head_dim_, T = B * S, H = qkv_.in_features();
  if (T == 0) return;
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd, w = qd + 2 * kvd;
  if (static_cast<int64_t>(c.wgrad_dqkv.size()) != T * w ||
      static_cast<int64_t>(c.wgrad_dout.size()) != T * H ||
      static_cast<int64_t>(c.attn.size()) != T * qd)
    fail("attention", "backward_weight of ", B, " x ", S,
         " tokens needs a backward() with defer_weight_grads first (the cache holds ",
         c.wgrad_dqkv.size(), " dqkv floats, expected ", T * w, ")");
  const bool sp = mode.sequence_parallel && group_.size() > 1;
  if (d_o != nullptr) o_.backward_weight(c.attn.data(), c.wgrad_dout.data(), T, d_o);
  if (dqkv != nullptr) {
    const float* x = xn;
    if (sp) {
      resize(c.xg, T * H);
      gather_from_sequence_forward(group_, xn, T, H, c.xg.data(), sequence_scratch(c.seq, T, H, group_));
      x = c.xg.data();
    }
    qkv_.backward_weight(x, c.wgrad_dqkv.data(), T, dqkv);
  }
  // Consumed: sizes back to 0 (their capacity stays for the next micro-batch).
  c.wgrad_dqkv.clear();
  c.wgrad_dout.clear();
}

}  // namespace parallm::parallel
