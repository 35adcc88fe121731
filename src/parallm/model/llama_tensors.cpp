#include "parallm/model/llama_tensors.h"

#include "parallm/core/error.h"
#include "parallm/parallel/shard.h"

namespace parallm {
namespace {

LlamaTensor entry(std::string name, Shape shape, ShardRule rule, LlamaPart part, int64_t layer,
                  int64_t expert = -1) {
  LlamaTensor t;
  t.name = std::move(name);
  t.shape = std::move(shape);
  t.rule = rule;
  t.part = part;
  t.layer = layer;
  t.expert = expert;
  t.matrix = part != LlamaPart::Norm;
  return t;
}

bool heads_fit(const ModelConfig& c, int tp) {
  return parallel::HeadPlan::fits(c.num_attention_heads, c.num_key_value_heads, tp);
}

LlamaTensor embedding(const ModelConfig& c) {
  return entry(names::kEmbed, {c.vocab_size, c.hidden_size}, ShardRule::VocabRows,
               LlamaPart::Embedding, -1);
}

// The tensors outside the decoder layers: the embedding, the final norm, lm_head when untied.
std::vector<LlamaTensor> outer_tensors(const ModelConfig& c) {
  std::vector<LlamaTensor> out{embedding(c), entry(names::kNorm, {c.hidden_size},
                                                   ShardRule::Replicated, LlamaPart::Norm, -1)};
  if (!c.tie_word_embeddings) out.push_back(llama_lm_head(c));
  return out;
}

// The FFN width is the tensor's own (dense MLP, experts and the shared expert may differ):
// rows of gate/up, columns of down.
parallel::ShardSpec ffn_shard(int64_t width, int tp, int tp_rank) {
  return parallel::ShardSpec::even(width, tp, tp_rank);
}

}  // namespace

std::string_view shard_rule_name(ShardRule r) {
  switch (r) {
    case ShardRule::Replicated:
      return "replicated";
    case ShardRule::VocabRows:
      return "vocab rows";
    case ShardRule::QHeadRows:
      return "query-head rows";
    case ShardRule::KvHeadRows:
      return "KV-head rows";
    case ShardRule::QHeadCols:
      return "query-head columns";
    case ShardRule::FfnRows:
      return "FFN rows";
    case ShardRule::FfnCols:
      return "FFN columns";
  }
  return "?";
}

int64_t LlamaTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<LlamaTensor> llama_layer_tensors(const ModelConfig& c, int64_t i) {
  const int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), f = c.intermediate_size;
  using R = ShardRule;
  using P = LlamaPart;
  std::vector<LlamaTensor> out;
  out.push_back(entry(names::layer(i, "input_layernorm.weight"), {h}, R::Replicated, P::Norm, i));
  // Biases (qwen2_moe) follow their weights; f32 vectors split by the same rows, counted as
  // norms are (kept in f32).
  auto proj = [&](const char* name, int64_t rows, ShardRule rule) {
    out.push_back(entry(names::layer(i, cat("self_attn.", name, ".weight")), {rows, h}, rule,
                        P::Attention, i));
    if (c.attention_bias)
      out.push_back(
          entry(names::layer(i, cat("self_attn.", name, ".bias")), {rows}, rule, P::Norm, i));
  };
  proj("q_proj", q, R::QHeadRows);
  proj("k_proj", kv, R::KvHeadRows);
  proj("v_proj", kv, R::KvHeadRows);
  out.push_back(
      entry(names::layer(i, "self_attn.o_proj.weight"), {h, q}, R::QHeadCols, P::Attention, i));
  out.push_back(
      entry(names::layer(i, "post_attention_layernorm.weight"), {h}, R::Replicated, P::Norm, i));
  if (c.is_qwen2_moe() && c.layer_is_moe(i)) {
    const int64_t ef = c.expert_ffn(), sf = c.shared_expert_intermediate_size;
    out.push_back(entry(names::layer(i, "mlp.gate.weight"), {c.num_local_experts, h}, R::Replicated,
                        P::Router, i));
    for (int64_t e = 0; e < c.num_local_experts; ++e) {
      const std::string ex = cat("mlp.experts.", e, ".");
      out.push_back(
          entry(names::layer(i, ex + "gate_proj.weight"), {ef, h}, R::FfnRows, P::Expert, i, e));
      out.push_back(
          entry(names::layer(i, ex + "up_proj.weight"), {ef, h}, R::FfnRows, P::Expert, i, e));
      out.push_back(
          entry(names::layer(i, ex + "down_proj.weight"), {h, ef}, R::FfnCols, P::Expert, i, e));
    }
    // The shared expert: a dense SwiGLU MLP (TP-split, on every EP rank), its gate replicated and
    // kept in f32 like the router.
    if (c.has_shared_expert()) {
      const std::string se = "mlp.shared_expert.";
      out.push_back(
          entry(names::layer(i, se + "gate_proj.weight"), {sf, h}, R::FfnRows, P::Mlp, i));
      out.push_back(entry(names::layer(i, se + "up_proj.weight"), {sf, h}, R::FfnRows, P::Mlp, i));
      out.push_back(
          entry(names::layer(i, se + "down_proj.weight"), {h, sf}, R::FfnCols, P::Mlp, i));
      out.push_back(entry(names::layer(i, "mlp.shared_expert_gate.weight"), {1, h}, R::Replicated,
                          P::Router, i));
    }
  } else if (c.layer_is_moe(i)) {
    out.push_back(entry(names::layer(i, "block_sparse_moe.gate.weight"), {c.num_local_experts, h},
                        R::Replicated, P::Router, i));
    for (int64_t e = 0; e < c.num_local_experts; ++e) {
      const std::string ex = cat("block_sparse_moe.experts.", e, ".");
      out.push_back(entry(names::layer(i, ex + "w1.weight"), {f, h}, R::FfnRows, P::Expert, i, e));
      out.push_back(entry(names::layer(i, ex + "w2.weight"), {h, f}, R::FfnCols, P::Expert, i, e));
      out.push_back(entry(names::layer(i, ex + "w3.weight"), {f, h}, R::FfnRows, P::Expert, i, e));
    }
  } else {
    out.push_back(entry(names::layer(i, "mlp.gate_proj.weight"), {f, h}, R::FfnRows, P::Mlp, i));
    out.push_back(entry(names::layer(i, "mlp.up_proj.weight"), {f, h}, R::FfnRows, P::Mlp, i));
    out.push_back(entry(names::layer(i, "mlp.down_proj.weight"), {h, f}, R::FfnCols, P::Mlp, i));
  }
  return out;
}

LlamaTensor llama_lm_head(const ModelConfig& c) {
  return entry(names::kLmHead, {c.vocab_size, c.hidden_size}, ShardRule::VocabRows,
               LlamaPart::LmHead, -1);
}

std::vector<LlamaTensor> llama_tensors(const ModelConfig& c) {
  const std::vector<LlamaTensor> outer = outer_tensors(c);
  std::vector<LlamaTensor> out{outer[0]};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    for (LlamaTensor& t : llama_layer_tensors(c, i)) out.push_back(std::move(t));
  out.insert(out.end(), outer.begin() + 1, outer.end());
  return out;
}

std::optional<LlamaTensor> find_llama_tensor(const ModelConfig& c, const std::string& name) {
  const std::string prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) == 0) {
    int64_t layer = 0;
    size_t i = prefix.size();
    for (; i < name.size() && name[i] >= '0' && name[i] <= '9' && layer < c.num_hidden_layers; ++i)
      layer = layer * 10 + (name[i] - '0');
    if (i == prefix.size() || i >= name.size() || name[i] != '.' || layer >= c.num_hidden_layers)
      return std::nullopt;
    for (LlamaTensor& t : llama_layer_tensors(c, layer))
      if (t.name == name) return std::move(t);
    return std::nullopt;
  }
  for (LlamaTensor& t : outer_tensors(c))
    if (t.name == name) return std::move(t);
  return std::nullopt;
}

std::string llama_tp_problem(const ModelConfig& c, int tp) {
  const int64_t q = c.num_attention_heads, kv = c.num_key_value_heads;
  if (!heads_fit(c, tp))
    return cat("tensor-parallel size ", tp, " does not fit ", q, " query heads and ", kv,
               " KV heads (it must divide the query heads, and divide or be a multiple of the KV "
               "heads); sizes that work: ",
               parallel::HeadPlan::valid_sizes(q, kv));
  // Near-even shards leave rank 0 empty first (n * 1 / tp == 0) when tp exceeds the dimension.
  if (tp > c.intermediate_size || tp > c.vocab_size)
    return cat("tensor-parallel size ", tp, " leaves rank 0 no rows of the FFN (",
               c.intermediate_size, ") or vocabulary (", c.vocab_size, ")");
  if (c.is_qwen2_moe() && (tp > c.moe_intermediate_size ||
                           (c.has_shared_expert() && tp > c.shared_expert_intermediate_size)))
    return cat("tensor-parallel size ", tp, " leaves rank 0 no rows of the experts' FFN (",
               "moe_intermediate_size ", c.moe_intermediate_size,
               ") or the shared expert's (shared_expert_intermediate_size ",
               c.shared_expert_intermediate_size, ")");
  return "";
}

std::string llama_expert_parallel_problem(const ModelConfig& c, int tp, int ep) {
  if (!c.is_moe())
    return "--enable-expert-parallel needs a mixture-of-experts model (this one is dense)";
  if (ep > 1)
    return cat("--enable-expert-parallel places the experts over the --tp ranks; it does not ",
               "take --ep ", ep, " as well");
  if (tp > c.num_local_experts)
    return cat("--enable-expert-parallel at --tp ", tp, " exceeds the model's ",
               c.num_local_experts, " experts (each TP rank holds at least one whole expert)");
  return "";
}

Slice llama_tensor_slice(const LlamaTensor& t, const ModelConfig& c, int tp, int tp_rank,
                         bool experts_whole) {
  if (std::string p = llama_tp_problem(c, tp); !p.empty()) fail("tp", p);
  if (tp_rank < 0 || tp_rank >= tp)
    fail("tp", "rank ", tp_rank, " is outside a tensor-parallel group of ", tp);
  // Whole experts keep their rule's kind (the loader checks it against the layer's spec).
  if (experts_whole && t.part == LlamaPart::Expert)
    return t.rule == ShardRule::FfnCols ? Slice::cols(0, t.shape.at(1))
                                        : Slice::rows(0, t.shape.at(0));
  const int64_t hd = c.head_dim;
  switch (t.rule) {
    case ShardRule::Replicated:
      return Slice::all();
    case ShardRule::VocabRows: {
      const parallel::ShardSpec s = parallel::ShardSpec::even(c.vocab_size, tp, tp_rank);
      return Slice::rows(s.begin, s.end);
    }
    case ShardRule::QHeadRows:
    case ShardRule::QHeadCols: {
      const parallel::HeadPlan p =
          parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, tp, tp_rank);
      const int64_t b = p.q_begin * hd, e = (p.q_begin + p.q_heads) * hd;
      return t.rule == ShardRule::QHeadRows ? Slice::rows(b, e) : Slice::cols(b, e);
    }
    case ShardRule::KvHeadRows: {
      const parallel::HeadPlan p =
          parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, tp, tp_rank);
      return Slice::rows(p.kv_begin * hd, (p.kv_begin + p.kv_heads) * hd);
    }
    case ShardRule::FfnRows: {
      const parallel::ShardSpec s = ffn_shard(t.shape.at(0), tp, tp_rank);
      return Slice::rows(s.begin, s.end);
    }
    case ShardRule::FfnCols: {
      const parallel::ShardSpec s = ffn_shard(t.shape.at(1), tp, tp_rank);
      return Slice::cols(s.begin, s.end);
    }
  }
  fail("model", "tensor \"", t.name, "\" has an unknown shard rule");
}

int64_t llama_slice_numel(const LlamaTensor& t, const Slice& s) {
  switch (s.kind) {
    case Slice::Kind::All:
      return t.numel();
    case Slice::Kind::Rows:
      return (s.end - s.begin) * (t.numel() / t.shape.at(0));
    case Slice::Kind::Cols:
      return (s.end - s.begin) * t.shape.at(0);
  }
  return 0;
}

uint64_t LlamaRankShare::bytes(DType dtype) const {
  // The MoE router is kept in f32 (it routes in f32), like the norms.
  return static_cast<uint64_t>(matrices() - router) * dtype_size(dtype) +
         static_cast<uint64_t>(norms + router) * sizeof(float);
}

double LlamaRankShare::bytes(double matrix_bytes) const {
  return double(matrices() - router) * matrix_bytes + double(norms + router) * sizeof(float);
}

LlamaRankShare llama_rank_share(const ModelConfig& c, int tp, int tp_rank, int64_t layer_begin,
                                int64_t layer_end, int ep, int ep_rank, bool experts_over_tp) {
  if (layer_begin < 0 || layer_begin >= layer_end || layer_end > c.num_hidden_layers)
    fail("model", "layer range [", layer_begin, ", ", layer_end, ") is not within the model's ",
         c.num_hidden_layers, " layers");
  const int64_t experts = c.num_local_experts;
  if (ep < 1 || ep_rank < 0 || ep_rank >= ep)
    fail("model", "expert-parallel rank ", ep_rank, " of ", ep);
  // The engine's placement (parallel::expert_range): contiguous, the first E % EP ranks one more.
  if (experts_over_tp) {
    if (std::string p = llama_expert_parallel_problem(c, tp, ep); !p.empty()) fail("moe", p);
  }
  int64_t e_begin = 0, e_end = 0;
  if (c.is_moe()) {
    const parallel::ShardSpec r = experts_over_tp ? parallel::expert_range(experts, tp, tp_rank)
                                                  : parallel::expert_range(experts, ep, ep_rank);
    e_begin = r.begin;
    e_end = r.end;
  }
  LlamaRankShare s;
  auto add = [&](const LlamaTensor& t, int64_t copies, bool as_head) {
    const int64_t n =
        copies * llama_slice_numel(t, llama_tensor_slice(t, c, tp, tp_rank, experts_over_tp));
    switch (t.part) {
      case LlamaPart::Embedding:
        (as_head ? s.head : s.embedding) += n;
        break;
      case LlamaPart::Norm:
        s.norms += n;
        break;
      case LlamaPart::Attention:
        s.attention += n;
        break;
      case LlamaPart::Mlp:
        s.mlp += n;
        break;
      case LlamaPart::Router:
        s.router += n;
        break;
      case LlamaPart::Expert:
        if (t.expert >= e_begin && t.expert < e_end) s.experts += n;
        break;
      case LlamaPart::LmHead:
        s.head += n;
        break;
    }
  };
  // Every decoder layer of one kind has the same tensors: count one of each kind and multiply
  // (Mixtral and dense models have one kind; qwen2_moe dense and sparse layers).
  int64_t sparse_layer = -1, dense_layer = -1, n_sparse = 0;
  for (int64_t i = layer_begin; i < layer_end; ++i) {
    const bool moe = c.layer_is_moe(i);
    n_sparse += moe ? 1 : 0;
    if (moe && sparse_layer < 0) sparse_layer = i;
    if (!moe && dense_layer < 0) dense_layer = i;
  }
  if (sparse_layer >= 0)
    for (const LlamaTensor& t : llama_layer_tensors(c, sparse_layer)) add(t, n_sparse, false);
  if (dense_layer >= 0)
    for (const LlamaTensor& t : llama_layer_tensors(c, dense_layer))
      add(t, layer_end - layer_begin - n_sparse, false);
  const bool first = layer_begin == 0, last = layer_end == c.num_hidden_layers;
  for (const LlamaTensor& t : outer_tensors(c)) {
    if (t.part == LlamaPart::Embedding && first) add(t, 1, false);
    if (t.part != LlamaPart::Embedding && last) add(t, 1, false);
  }
  // Tied: the last stage uses the embedding's rows as the LM head; a stage that also holds the
  // embedding shares them, any other stage loads its own copy.
  if (last && c.tie_word_embeddings && !first) add(embedding(c), 1, true);
  return s;
}

uint64_t llama_rank_weight_bytes(const ModelConfig& c, DType weight_dtype, int tp, int tp_rank,
                                 int64_t layer_begin, int64_t layer_end) {
  return llama_rank_share(c, tp, tp_rank, layer_begin, layer_end).bytes(weight_dtype);
}

}  // namespace parallm
