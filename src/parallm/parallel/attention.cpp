#include "parallm/parallel/attention.h"

#include <cmath>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/kernels/attention.h"
#include "parallm/kernels/backward.h"

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

ParallelAttention::ParallelAttention(Tensor qkv, Tensor o, const HeadPlan& heads, int64_t head_dim,
                                     RopeSpec rope, comm::Group group)
    : heads_(heads), head_dim_(head_dim), rope_(std::move(rope)), group_(std::move(group)) {
  if (heads_.q_heads <= 0 || heads_.kv_heads <= 0 || heads_.q_heads % heads_.kv_heads != 0)
    fail("attention", "rank's heads: ", heads_.q_heads, " query heads over ", heads_.kv_heads,
         " KV heads (need a positive multiple)");
  if (static_cast<int64_t>(rope_.inv_freq.size()) * 2 != head_dim_)
    fail("attention", "RoPE has ", rope_.inv_freq.size(), " frequencies for head_dim ", head_dim_);
  qkv_ = ColumnParallelLinear(std::move(qkv), qkv_spec(heads_, head_dim_), group_);
  o_ = RowParallelLinear(std::move(o), o_spec(heads_, head_dim_), group_);
  if (o_.weight().dim(0) != qkv_.weight().dim(1))
    fail("attention", "o_proj shard ", o_.weight().describe(), " does not map back to hidden ",
         qkv_.weight().dim(1));
}

void ParallelAttention::forward(const float* xn, const std::vector<SeqChunk>& chunks,
                                const int32_t* positions, KvStore& kv, int64_t layer,
                                float* scratch, float* out) const {
  const int64_t hd = head_dim_;
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd;
  int64_t T = 0;
  for (const SeqChunk& ch : chunks) {
    if (ch.n_tokens < 0 || ch.start_pos < 0 || ch.start_pos + ch.n_tokens > kv.capacity())
      fail("attention", "sequence ", ch.slot, ": positions [", ch.start_pos, ", ",
           ch.start_pos + ch.n_tokens, ") exceed the KV cache's ", kv.capacity(), " positions");
    T += ch.n_tokens;
  }
  if (T == 0) return;
  float* qkv = scratch;
  float* q = qkv + T * (qd + 2 * kvd);
  float* k = q + T * qd;
  float* v = k + T * kvd;
  float* attn = v + T * kvd;

  qkv_.forward(xn, T, qkv);  // [T, qd + 2 kvd]: each row q | k | v
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

void ParallelAttention::forward_train(const float* xn, int64_t B, int64_t S, AttentionCache& c,
                                      float* out) const {
  const int64_t hd = head_dim_, T = B * S;
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd, w = qd + 2 * kvd;
  c.qkv.resize(static_cast<size_t>(T * w));
  c.q.resize(static_cast<size_t>(T * qd));
  c.k.resize(static_cast<size_t>(T * kvd));
  c.v.resize(static_cast<size_t>(T * kvd));
  c.probs.resize(static_cast<size_t>(B * heads_.q_heads * S * S));
  c.attn.resize(static_cast<size_t>(T * qd));
  c.positions.resize(static_cast<size_t>(T));
  if (T == 0) return;
  for (int64_t t = 0; t < T; ++t) c.positions[t] = static_cast<int32_t>(t % S);
  qkv_.forward(xn, T, c.qkv.data());  // each row q | k | v
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
                           heads_.kv_heads, hd, c.attn.data(), c.probs.data());
  o_.forward(c.attn.data(), T, out);  // partial sums over this rank's heads, all-reduced
}

void ParallelAttention::backward(const float* xn, AttentionCache& c, const float* dout, int64_t B,
                                 int64_t S, float* dxn, float* dqkv, float* d_o) const {
  const int64_t hd = head_dim_, T = B * S;
  if (T == 0) return;
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd, w = qd + 2 * kvd;
  c.dattn.resize(static_cast<size_t>(T * qd));
  c.dq.resize(static_cast<size_t>(T * qd));
  c.dk.resize(static_cast<size_t>(T * kvd));
  c.dv.resize(static_cast<size_t>(T * kvd));
  o_.backward(c.attn.data(), dout, T, c.dattn.data(), d_o);  // no communication
  kernels::attention_backward(c.q.data(), c.k.data(), c.v.data(), c.probs.data(), c.dattn.data(), B,
                            S, heads_.q_heads, heads_.kv_heads, hd, c.dq.data(), c.dk.data(),
                            c.dv.data());
  const float* inv = rope_.inv_freq.data();
  kernels::rope_backward(c.dq.data(), T, heads_.q_heads, hd, c.positions.data(), inv, rope_.style);
  kernels::rope_backward(c.dk.data(), T, heads_.kv_heads, hd, c.positions.data(), inv, rope_.style);
  float* g = c.qkv.data();  // the forward's qkv is no longer needed: dqkv [T, w] goes there
  for (int64_t t = 0; t < T; ++t) {
    float* row = g + t * w;
    std::memcpy(row, c.dq.data() + t * qd, qd * sizeof(float));
    std::memcpy(row + qd, c.dk.data() + t * kvd, kvd * sizeof(float));
    std::memcpy(row + qd + kvd, c.dv.data() + t * kvd, kvd * sizeof(float));
  }
  qkv_.backward(xn, g, T, dxn, dqkv);  // all-reduces dxn; sums the replicated K/V rows' gradient
}

}  // namespace parallm::parallel
