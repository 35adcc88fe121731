#include "parallm/model/llama.h"

#include <cmath>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"
#include "parallm/kernels/attention.h"
#include "parallm/kernels/matmul.h"

namespace parallm {
namespace {

// Stacks 2-D tensors of one dtype and width by rows (fusing Q/K/V, and gate/up, into one GEMM).
Tensor concat_rows(const std::vector<Tensor>& parts) {
  int64_t rows = 0;
  for (const Tensor& p : parts) rows += p.dim(0);
  Tensor out = Tensor::empty(parts.at(0).dtype(), {rows, parts[0].dim(1)});
  char* dst = static_cast<char*>(out.raw());
  for (const Tensor& p : parts) {
    std::memcpy(dst, p.raw(), p.nbytes());
    dst += p.nbytes();
  }
  return out;
}

std::vector<float> read_vector(const WeightSource& src, const std::string& name) {
  Tensor t = src.read(name, DType::F32);
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

// Scratch buffers that only grow, one set per thread: a rank's forward pass reuses them instead of
// allocating (and page-faulting) megabytes per layer during prefill.
std::vector<float>& scratch(int which, size_t n) {
  thread_local std::vector<float> bufs[8];
  std::vector<float>& b = bufs[which];
  if (b.size() < n) b.resize(n);
  return b;
}

}  // namespace

LlamaModel::LlamaModel(const ModelConfig& config, const WeightSource& source, comm::Group tp,
                       LlamaOptions options)
    : config_(config), opts_(options), tp_(std::move(tp)) {
  const ModelConfig& c = config_;
  if (opts_.layer_end < 0) opts_.layer_end = c.num_hidden_layers;
  if (opts_.layer_begin < 0 || opts_.layer_begin >= opts_.layer_end ||
      opts_.layer_end > c.num_hidden_layers)
    fail("model", "layer range [", opts_.layer_begin, ", ", opts_.layer_end,
         ") is not within the model's ", c.num_hidden_layers, " layers");
  check_llama_weights(source, c);
  const int tp_size = tp_.size(), tp_rank = tp_.rank();
  heads_ = parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, tp_size, tp_rank);
  ffn_ = parallel::ShardSpec::even(c.intermediate_size, tp_size, tp_rank);
  vocab_ = parallel::ShardSpec::even(c.vocab_size, tp_size, tp_rank);
  if (ffn_.size() == 0 || vocab_.size() == 0)
    fail("tp", "tensor-parallel size ", tp_size, " leaves rank ", tp_rank, " no rows of the FFN (",
         c.intermediate_size, ") or vocabulary (", c.vocab_size, ")");
  inv_freq_ = c.rope_inv_freq();
  rope_style_ =
      c.rope_interleaved ? kernels::RopeStyle::Interleaved : kernels::RopeStyle::HalfSplit;

  const DType wt = opts_.weight_dtype;
  const int64_t hd = c.head_dim;
  const Slice q_rows = Slice::rows(heads_.q_begin * hd, (heads_.q_begin + heads_.q_heads) * hd);
  const Slice kv_rows = Slice::rows(heads_.kv_begin * hd, (heads_.kv_begin + heads_.kv_heads) * hd);
  const parallel::ShardSpec q_cols{c.q_dim(), q_rows.begin, q_rows.end};
  const parallel::ShardSpec qkv_out{c.q_dim() + 2 * c.kv_dim(), 0,
                                    q_rows.end - q_rows.begin + 2 * (kv_rows.end - kv_rows.begin)};
  const parallel::ShardSpec gate_up_out{2 * c.intermediate_size, 0, 2 * ffn_.size()};

  for (int64_t i = opts_.layer_begin; i < opts_.layer_end; ++i) {
    Layer L;
    L.attn_norm = read_vector(source, names::layer(i, "input_layernorm.weight"));
    L.ffn_norm = read_vector(source, names::layer(i, "post_attention_layernorm.weight"));
    L.qkv = parallel::ColumnParallelLinear(
        concat_rows({source.read(names::layer(i, "self_attn.q_proj.weight"), wt, q_rows),
                     source.read(names::layer(i, "self_attn.k_proj.weight"), wt, kv_rows),
                     source.read(names::layer(i, "self_attn.v_proj.weight"), wt, kv_rows)}),
        qkv_out);
    L.o = parallel::RowParallelLinear(source.read(names::layer(i, "self_attn.o_proj.weight"), wt,
                                                  Slice::cols(q_cols.begin, q_cols.end)),
                                      q_cols, tp_);
    L.gate_up = parallel::ColumnParallelLinear(
        concat_rows({source.read(names::layer(i, "mlp.gate_proj.weight"), wt,
                                 Slice::rows(ffn_.begin, ffn_.end)),
                     source.read(names::layer(i, "mlp.up_proj.weight"), wt,
                                 Slice::rows(ffn_.begin, ffn_.end))}),
        gate_up_out);
    L.down = parallel::RowParallelLinear(
        source.read(names::layer(i, "mlp.down_proj.weight"), wt, Slice::cols(ffn_.begin, ffn_.end)),
        ffn_, tp_);
    weight_bytes_ += L.qkv.weight().nbytes() + L.o.weight().nbytes() + L.gate_up.weight().nbytes() +
                     L.down.weight().nbytes() + 2 * c.hidden_size * sizeof(float);
    layers_.push_back(std::move(L));
  }

  const Slice vocab_rows = Slice::rows(vocab_.begin, vocab_.end);
  if (has_embedding()) {
    embedding_ =
        parallel::VocabParallelEmbedding(source.read(names::kEmbed, wt, vocab_rows), vocab_, tp_);
    weight_bytes_ += embedding_.table().nbytes();
  }
  if (has_head()) {
    final_norm_ = read_vector(source, names::kNorm);
    weight_bytes_ += final_norm_.size() * sizeof(float);
    if (c.tie_word_embeddings && has_embedding()) {
      lm_head_ = embedding_.table();  // same rows, same storage
    } else {
      lm_head_ =
          source.read(c.tie_word_embeddings ? names::kEmbed : names::kLmHead, wt, vocab_rows);
      weight_bytes_ += lm_head_.nbytes();
    }
  }
}

uint64_t LlamaModel::decode_bytes_per_token() const {
  uint64_t b = 0;
  for (const Layer& L : layers_)
    b += L.qkv.weight().nbytes() + L.o.weight().nbytes() + L.gate_up.weight().nbytes() +
         L.down.weight().nbytes() + 2 * config_.hidden_size * sizeof(float);
  if (has_embedding()) b += config_.hidden_size * dtype_size(opts_.weight_dtype);
  if (has_head()) b += lm_head_.nbytes() + final_norm_.size() * sizeof(float);
  return b;
}

void LlamaModel::embed(const int32_t* ids, int64_t T, float* x) const {
  if (!has_embedding()) fail("model", "embed() called on a stage without the embedding");
  embedding_.forward(ids, T, x);
}

void LlamaModel::forward_layers(float* x, const std::vector<SeqChunk>& chunks, KvStore& kv) const {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, hd = c.head_dim;
  const int64_t qd = heads_.q_heads * hd, kvd = heads_.kv_heads * hd;
  const int64_t fl = ffn_.size();
  int64_t T = 0;
  for (const SeqChunk& ch : chunks) {
    if (ch.start_pos < 0 || ch.start_pos + ch.n_tokens > kv.capacity())
      fail("model", "sequence ", ch.slot, ": positions [", ch.start_pos, ", ",
           ch.start_pos + ch.n_tokens, ") exceed the KV cache's ", kv.capacity(), " positions");
    T += ch.n_tokens;
  }
  if (T == 0) return;

  std::vector<int32_t> positions(T);
  {
    int64_t t = 0;
    for (const SeqChunk& ch : chunks)
      for (int64_t i = 0; i < ch.n_tokens; ++i)
        positions[t++] = static_cast<int32_t>(ch.start_pos + i);
  }
  // x: [T, H]; xn: [T, H]; qkv: [T, qd + 2 kvd]; q, attn: [T, qd]; k, v: [T, kvd];
  // gu: [T, 2 fl]; out: [T, H]
  float* xn = scratch(0, T * H).data();
  float* qkv = scratch(1, T * (qd + 2 * kvd)).data();
  float* q = scratch(2, T * qd).data();
  float* k = scratch(3, T * kvd).data();
  float* v = scratch(4, T * kvd).data();
  float* attn = scratch(5, T * qd).data();
  float* gu = scratch(6, T * 2 * fl).data();
  float* out = scratch(7, T * H).data();
  const kernels::AttentionShape shape{heads_.q_heads, heads_.kv_heads, hd, kv.kv_stride()};
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float eps = static_cast<float>(c.rms_norm_eps);

  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& L = layers_[li];
    TraceSpan span(thread_trace() ? cat("layer ", opts_.layer_begin + static_cast<int64_t>(li))
                                  : std::string(),
                   "compute");
    // Attention block.
    kernels::rmsnorm(x, L.attn_norm.data(), xn, T, H, eps);
    L.qkv.forward(xn, T, qkv);
    for (int64_t t = 0; t < T; ++t) {
      const float* row = qkv + t * (qd + 2 * kvd);
      std::memcpy(q + t * qd, row, qd * sizeof(float));
      std::memcpy(k + t * kvd, row + qd, kvd * sizeof(float));
      std::memcpy(v + t * kvd, row + qd + kvd, kvd * sizeof(float));
    }
    kernels::rope(q, T, heads_.q_heads, hd, positions.data(), inv_freq_.data(), rope_style_);
    kernels::rope(k, T, heads_.kv_heads, hd, positions.data(), inv_freq_.data(), rope_style_);
    int64_t off = 0;
    for (const SeqChunk& ch : chunks) {
      float* kc = kv.keys(static_cast<int64_t>(li), ch.slot);
      float* vc = kv.values(static_cast<int64_t>(li), ch.slot);
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
    L.o.forward(attn, T, out);  // all-reduce #1
    for (int64_t i = 0; i < T * H; ++i) x[i] += out[i];

    // MLP block.
    kernels::rmsnorm(x, L.ffn_norm.data(), xn, T, H, eps);
    L.gate_up.forward(xn, T, gu);
    for (int64_t t = 0; t < T; ++t) {
      float* row = gu + t * 2 * fl;
      kernels::silu_mul(row, row + fl, gu + t * fl, fl);  // packs [T, fl] at the front of gu
    }
    L.down.forward(gu, T, out);  // all-reduce #2
    for (int64_t i = 0; i < T * H; ++i) x[i] += out[i];
  }
}

void LlamaModel::head(float* x, int64_t R, float* logits) const {
  if (!has_head()) fail("model", "head() called on a stage without the LM head");
  kernels::rmsnorm(x, final_norm_.data(), x, R, config_.hidden_size,
                   static_cast<float>(config_.rms_norm_eps));
  kernels::matmul(x, R, lm_head_, logits);
}

}  // namespace parallm
