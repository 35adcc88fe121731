#include "parallm/model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"
#include "parallm/kernels/ops.h"
#include "parallm/kernels/quant_matmul.h"
#include "parallm/model/llama_tensors.h"

namespace parallm {
namespace {

// The error for a block-quantized tensor whose TP column split misses the block boundaries,
// naming the TP sizes (up to 64) whose every rank's columns fall on them.
std::string quantized_tp_problem(const ModelConfig& c, const std::string& name, DType type,
                                 int tp_size) {
  const std::optional<LlamaTensor> t = find_llama_tensor(c, name);
  std::string ok;
  for (int tp = 1; tp <= 64 && t; ++tp) {
    if (!llama_tp_problem(c, tp).empty()) continue;
    bool aligned = true;
    for (int r = 0; r < tp && aligned; ++r) {
      const Slice s = llama_tensor_slice(*t, c, tp, r);
      aligned = s.kind != Slice::Kind::Cols ||
                (s.begin % dtype_block(type) == 0 && s.end % dtype_block(type) == 0);
    }
    if (aligned) ok += cat(ok.empty() ? "" : ", ", tp);
  }
  return cat("tensor \"", name, "\" is ", dtype_name(type), " (", dtype_block(type),
             "-value blocks): tensor-parallel size ", tp_size,
             " splits its columns off the block boundaries; sizes that work: ", ok);
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
  workspace_layout_ = workspace_layout(c, tp_size, tp_rank);
  expert_group_ = opts_.ep;
  if (opts_.experts_over_tp) {
    if (std::string why = llama_expert_parallel_problem(c, tp_size, opts_.ep.size()); !why.empty())
      fail("moe", why);
    // Its own group over the same ranks: --comm-stats shows the MoE all-reduce apart from TP's.
    if (tp_size > 1) expert_group_ = tp_.split(0, tp_rank, "ep_tp");
  }
  if (c.is_moe()) {
    experts_ = parallel::expert_range(c.num_local_experts, expert_group_.size(),
                                      expert_group_.rank());
    // Under experts_over_tp every expert is whole on its rank.
    expert_ffn_ = opts_.experts_over_tp
                      ? parallel::ShardSpec::even(c.expert_ffn(), 1, 0)
                      : parallel::ShardSpec::even(c.expert_ffn(), tp_size, tp_rank);
    if (c.has_shared_expert())
      shared_ffn_ = parallel::ShardSpec::even(c.shared_expert_intermediate_size, tp_size, tp_rank);
    if (expert_ffn_.size() == 0 || (c.has_shared_expert() && shared_ffn_.size() == 0))
      fail("tp", llama_tp_problem(c, tp_size));
  } else if (opts_.ep.size() > 1) {
    fail("moe", parallel::moe_ep_problem(0, opts_.ep.size()));
  }
  const parallel::RopeSpec rope{c.rope_inv_freq(), c.rope_interleaved
                                                       ? kernels::RopeStyle::Interleaved
                                                       : kernels::RopeStyle::HalfSplit};

  const DType wt = opts_.weight_dtype;
  const int64_t hd = c.head_dim;
  // Which part of each tensor this rank reads is the tensor table's rule (model/llama_tensors.h),
  // the one init-model, the weight checker and the planner use. The layers name the same rows in
  // their shard specs; a disagreement would load wrong bytes silently, so it is an error here.
  auto slice_of = [&](const std::string& name) {
    const std::optional<LlamaTensor> t = find_llama_tensor(c, name);
    if (!t) fail("model", "tensor \"", name, "\" is not in the LLaMA tensor table");
    return llama_tensor_slice(*t, c, tp_size, tp_rank, opts_.experts_over_tp);
  };
  auto read = [&](const std::string& name, Slice::Kind kind, const parallel::ShardSpec& want) {
    const Slice s = slice_of(name);
    if (s.kind != kind || s.begin != want.begin || s.end != want.end)
      fail("model", "tensor \"", name, "\": the tensor table gives rank ", tp_rank, " of ", tp_size,
           " ", s.kind == Slice::Kind::Cols ? "cols" : "rows", " [", s.begin, ", ", s.end,
           ") but the layer holds ", kind == Slice::Kind::Cols ? "cols" : "rows", " [", want.begin,
           ", ", want.end, ")");
    const DType src = source.info(name).dtype;
    if (opts_.keep_quantized && is_block(src)) {
      // Columns split over TP must fall on the format's block boundaries.
      if (s.kind == Slice::Kind::Cols && (s.begin % dtype_block(src) || s.end % dtype_block(src)))
        fail("tp", quantized_tp_problem(c, name, src, tp_size));
      return source.read(name, src, s);
    }
    return source.read(name, wt, s);
  };
  auto read_norm = [&](const std::string& name) {
    Tensor t = source.read(name, DType::F32, slice_of(name));
    return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
  };
  // Linear weights only (never the embedding table, which is read by row): Q4_0 / Q8_0 / Q4_K
  // repacked for the AVX2 GEMV (kernels::repack_quant_weight), after the TP split above.
  auto linear = [&](Tensor t) {
    return t.defined() && kernels::quant_repack_enabled(t.dtype()) ? kernels::repack_quant_weight(t)
                                                                  : t;
  };
  // Row blocks for one column-parallel weight: fused into one tensor when they share a dtype,
  // else (a Q4_K_M file's Q4_K q, k with a Q6_K v) each kept and repacked apart.
  auto fuse = [&](std::vector<Tensor> parts, bool repack) -> parallel::RowBlocks {
    bool one_dtype = true;
    for (const Tensor& t : parts) one_dtype &= t.dtype() == parts.at(0).dtype();
    if (one_dtype) {
      Tensor w = parallel::concat_rows(parts);
      return repack ? linear(std::move(w)) : w;
    }
    if (repack)
      for (Tensor& t : parts) t = linear(std::move(t));
    return parts;
  };
  // A fused weight: each part's rows, stacked in the spec's order.
  auto read_fused = [&](int64_t i, const parallel::FusedShardSpec& spec, const char* prefix,
                        bool repack = true) {
    std::vector<Tensor> parts;
    for (const parallel::FusedPart& p : spec.parts)
      parts.push_back(
          read(names::layer(i, cat(prefix, p.name, ".weight")), Slice::Kind::Rows, p.rows));
    return fuse(std::move(parts), repack);
  };
  const parallel::FusedShardSpec qkv_spec = parallel::ParallelAttention::qkv_spec(heads_, hd);
  const parallel::ShardSpec o_cols = parallel::ParallelAttention::o_spec(heads_, hd);
  const parallel::FusedShardSpec gate_up_spec = parallel::ParallelMlp::gate_up_spec(ffn_);
  // q/k/v biases (Qwen2): the rows of each part, as its weight's, stacked in the same order.
  auto read_qkv_bias = [&](int64_t i) {
    std::vector<float> bias;
    if (!c.attention_bias) return bias;
    for (const parallel::FusedPart& p : qkv_spec.parts) {
      const std::string name = names::layer(i, cat("self_attn.", p.name, ".bias"));
      const Slice s = slice_of(name);
      if (s.kind != Slice::Kind::Rows || s.begin != p.rows.begin || s.end != p.rows.end)
        fail("model", "tensor \"", name, "\": the tensor table's rows [", s.begin, ", ", s.end,
             ") are not the layer's [", p.rows.begin, ", ", p.rows.end, ")");
      Tensor t = source.read(name, DType::F32, s);
      bias.insert(bias.end(), t.data<float>(), t.data<float>() + t.numel());
    }
    return bias;
  };

  for (int64_t i = opts_.layer_begin; i < opts_.layer_end; ++i) {
    Layer L;
    L.attn_norm = read_norm(names::layer(i, "input_layernorm.weight"));
    L.ffn_norm = read_norm(names::layer(i, "post_attention_layernorm.weight"));
    L.attention = parallel::ParallelAttention(
        read_fused(i, qkv_spec, "self_attn."),
        linear(read(names::layer(i, "self_attn.o_proj.weight"), Slice::Kind::Cols, o_cols)), heads_,
        hd, rope, tp_, read_qkv_bias(i));
    if (c.layer_is_moe(i)) {
      // The router whole (f32: it is routed in f32); only this EP rank's experts, each its TP
      // slice of w1 and w3 rows (fused) and w2 columns (qwen2_moe: gate_proj, up_proj, down_proj).
      const bool qwen = c.is_qwen2_moe();
      const std::string moe = qwen ? "mlp." : "block_sparse_moe.";
      const char* w1n = qwen ? "gate_proj.weight" : "w1.weight";
      const char* w3n = qwen ? "up_proj.weight" : "w3.weight";
      const char* w2n = qwen ? "down_proj.weight" : "w2.weight";
      Tensor router = source.read(names::layer(i, moe + "gate.weight"), DType::F32,
                                  slice_of(names::layer(i, moe + "gate.weight")));
      std::vector<Tensor> w13, w2;
      for (int64_t e = experts_.begin; e < experts_.end; ++e) {
        const std::string ex = cat(moe, "experts.", e, ".");
        Tensor w1 = read(names::layer(i, ex + w1n), Slice::Kind::Rows, expert_ffn_);
        Tensor w3 = read(names::layer(i, ex + w3n), Slice::Kind::Rows, expert_ffn_);
        w13.push_back(parallel::concat_rows({w1, w3}));
        w2.push_back(read(names::layer(i, ex + w2n), Slice::Kind::Cols, expert_ffn_));
      }
      L.is_moe = true;
      L.moe = opts_.experts_over_tp
                  ? parallel::MoeLayer(std::move(router), std::move(w13), std::move(w2),
                                       static_cast<int>(c.num_experts_per_tok), experts_,
                                       expert_ffn_, expert_group_, comm::Group(), c.norm_topk_prob,
                                       parallel::MoeMode::AllReduce)
                  : parallel::MoeLayer(std::move(router), std::move(w13), std::move(w2),
                                       static_cast<int>(c.num_experts_per_tok), experts_,
                                       expert_ffn_, opts_.ep, tp_, c.norm_topk_prob);
      if (c.has_shared_expert()) {
        L.shared = parallel::ParallelMlp(
            read_fused(i, parallel::ParallelMlp::gate_up_spec(shared_ffn_), "mlp.shared_expert.",
                       /*repack=*/false),
            read(names::layer(i, "mlp.shared_expert.down_proj.weight"), Slice::Kind::Cols,
                 shared_ffn_),
            shared_ffn_, tp_);
        L.shared_gate = read_norm(names::layer(i, "mlp.shared_expert_gate.weight"));
      }
    } else {
      L.mlp = parallel::ParallelMlp(
          read_fused(i, gate_up_spec, "mlp."),
          linear(read(names::layer(i, "mlp.down_proj.weight"), Slice::Kind::Cols, ffn_)), ffn_,
          tp_);
    }
    weight_bytes_ += L.bytes();
    layers_.push_back(std::move(L));
  }

  if (has_embedding()) {
    embedding_ = parallel::VocabParallelEmbedding(read(names::kEmbed, Slice::Kind::Rows, vocab_),
                                                  vocab_, tp_);
    weight_bytes_ += embedding_.table().nbytes();
  }
  if (has_head()) {
    final_norm_ = read_norm(names::kNorm);
    weight_bytes_ += final_norm_.size() * sizeof(float);
    if (c.tie_word_embeddings && has_embedding()) {
      lm_head_ = parallel::VocabParallelLmHead(embedding_.table(), vocab_, tp_);  // same storage
    } else {
      lm_head_ = parallel::VocabParallelLmHead(
          linear(read(c.tie_word_embeddings ? names::kEmbed : names::kLmHead, Slice::Kind::Rows,
                      vocab_)),
          vocab_, tp_);
      weight_bytes_ += lm_head_.weight().nbytes();
    }
  }
}

uint64_t LlamaModel::Layer::bytes() const {
  uint64_t ffn =
      is_moe ? moe.weight_bytes() : mlp.gate_up().weight_bytes() + mlp.down().weight().nbytes();
  if (!shared_gate.empty())
    ffn += shared.gate_up().weight_bytes() + shared.down().weight().nbytes() +
           shared_gate.size() * sizeof(float);
  return attention.qkv().weight_bytes() + attention.o().weight().nbytes() + ffn +
         (attention.qkv_bias().size() + attn_norm.size() + ffn_norm.size()) * sizeof(float);
}

std::vector<int64_t> LlamaModel::moe_expert_rows() const {
  std::vector<int64_t> rows(config_.is_moe() ? config_.num_local_experts : 0, 0);
  for (const Layer& L : layers_)
    if (L.is_moe)
      for (size_t i = 0; i < L.moe.expert_rows().size(); ++i)
        rows[L.moe.experts().begin + static_cast<int64_t>(i)] += L.moe.expert_rows()[i];
  return rows;
}

std::vector<int64_t> LlamaModel::moe_rows_sent() const {
  std::vector<int64_t> rows;
  for (const Layer& L : layers_)
    if (L.is_moe) {
      rows.resize(L.moe.rows_sent().size(), 0);
      for (size_t r = 0; r < rows.size(); ++r) rows[r] += L.moe.rows_sent()[r];
    }
  return rows;
}

uint64_t LlamaModel::decode_bytes_per_token() const {
  uint64_t b = 0;
  for (const Layer& L : layers_) {
    b += L.bytes();
    if (L.is_moe) {
      // A token reads k of the E experts: this rank's experts count at k / E (the expectation
      // under uniform routing), so the sum over EP ranks is k experts' bytes.
      const uint64_t experts = L.moe.weight_bytes() - L.moe.num_experts() * L.moe.hidden() * 4;
      b -= experts;
      b += experts * static_cast<uint64_t>(L.moe.top_k()) /
           static_cast<uint64_t>(L.moe.num_experts());
    }
  }
  if (has_embedding()) b += config_.hidden_size * dtype_size(opts_.weight_dtype);
  if (has_head()) b += lm_head_.weight().nbytes() + final_norm_.size() * sizeof(float);
  return b;
}

void LlamaModel::embed(const int32_t* ids, int64_t T, float* x) const {
  if (!has_embedding()) fail("model", "embed() called on a stage without the embedding");
  embedding_.forward(ids, T, x);
}

WorkspaceLayout LlamaModel::workspace_layout(const ModelConfig& config, int tp_size, int tp_rank) {
  const parallel::HeadPlan heads = parallel::HeadPlan::make(
      config.num_attention_heads, config.num_key_value_heads, tp_size, tp_rank);
  const parallel::ShardSpec ffn =
      parallel::ShardSpec::even(config.intermediate_size, tp_size, tp_rank);
  int64_t scratch = std::max(parallel::ParallelAttention::scratch_floats(heads, config.head_dim, 1),
                             parallel::ParallelMlp::scratch_floats(ffn, 1));
  // qwen2_moe's shared expert: its output [T, hidden] beside its own MLP scratch.
  if (config.has_shared_expert())
    scratch = std::max(
        scratch,
        config.hidden_size +
            parallel::ParallelMlp::scratch_floats(
                parallel::ShardSpec::even(config.shared_expert_intermediate_size, tp_size, tp_rank),
                1));
  return {config.hidden_size, scratch};
}

uint64_t LlamaModel::workspace_bytes(const ModelConfig& config, int tp_size, int tp_rank,
                                     int64_t max_tokens) {
  return workspace_layout(config, tp_size, tp_rank).bytes(max_tokens);
}

Workspace LlamaModel::make_workspace(int64_t max_tokens) const {
  return Workspace(workspace_layout_, max_tokens);
}

void LlamaModel::forward_layers(float* x, const std::vector<SeqChunk>& chunks, KvStore& kv,
                                Workspace& ws, const LayerHook& after_layer) const {
  const int64_t H = config_.hidden_size;
  int64_t T = 0;
  for (const SeqChunk& ch : chunks) {
    if (ch.n_tokens < 0)
      fail("model", "sequence ", ch.slot, ": a chunk of ", ch.n_tokens, " tokens");
    T += ch.n_tokens;
  }
  if (T == 0) return;
  if (T > ws.max_tokens())
    fail("model", "forward of ", T, " tokens (", chunks.size(), " chunks) exceeds the workspace's ",
         ws.max_tokens(), " tokens; make the workspace for the largest step");
  if (!(ws.layout() == workspace_layout_))
    fail("model", "the workspace (hidden ", ws.layout().hidden, ", ", ws.layout().scratch_per_token,
         " scratch floats per token) was made for another model or shard");

  int32_t* positions = ws.positions();
  {
    int64_t t = 0;
    for (const SeqChunk& ch : chunks)
      for (int64_t i = 0; i < ch.n_tokens; ++i)
        positions[t++] = static_cast<int32_t>(ch.start_pos + i);
  }
  float* xn = ws.normed();      // [T, H]
  float* out = ws.block_out();  // [T, H]
  const float eps = static_cast<float>(config_.rms_norm_eps);

  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& L = layers_[li];
    TraceSpan span(thread_trace() ? cat("layer ", opts_.layer_begin + static_cast<int64_t>(li))
                                  : std::string(),
                   "compute");
    kernels::rmsnorm(x, L.attn_norm.data(), xn, T, H, eps);
    L.attention.forward(xn, chunks, positions, kv, static_cast<int64_t>(li), ws.scratch(), out);
    for (int64_t i = 0; i < T * H; ++i) x[i] += out[i];

    kernels::rmsnorm(x, L.ffn_norm.data(), xn, T, H, eps);
    if (L.is_moe) {
      L.moe.forward(xn, T, out);
      if (!L.shared_gate.empty()) {
        // routed + sigmoid(xn . w_sg) * shared_expert(xn); the gate's dot product per token in a
        // fixed order, like the router's.
        float* shared = ws.scratch();  // [T, H], then the MLP's own scratch
        L.shared.forward(xn, T, shared + T * H, shared);
        const float* g = L.shared_gate.data();
        for (int64_t t = 0; t < T; ++t) {
          const float* xt = xn + t * H;
          float s = 0;
          for (int64_t h = 0; h < H; ++h) s += xt[h] * g[h];
          const float gate = 1.0f / (1.0f + std::exp(-s));
          float* o = out + t * H;
          const float* sh = shared + t * H;
          for (int64_t h = 0; h < H; ++h) o[h] += gate * sh[h];
        }
      }
    } else {
      L.mlp.forward(xn, T, ws.scratch(), out);
    }
    for (int64_t i = 0; i < T * H; ++i) x[i] += out[i];
    if (after_layer) after_layer(opts_.layer_begin + static_cast<int64_t>(li), x, T);
  }
}

const parallel::VocabParallelLmHead& LlamaModel::lm_head() const {
  if (!has_head()) fail("model", "lm_head() called on a stage without the LM head");
  return lm_head_;
}

void LlamaModel::head(float* x, int64_t R, float* logits) const {
  if (!has_head()) fail("model", "head() called on a stage without the LM head");
  kernels::rmsnorm(x, final_norm_.data(), x, R, config_.hidden_size,
                   static_cast<float>(config_.rms_norm_eps));
  lm_head_.forward(x, R, logits);
}

}  // namespace parallm
