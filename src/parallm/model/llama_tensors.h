// The one table of a LLaMA model's tensors: Hugging Face name, full shape, and how tensor
// parallelism splits each one. init-model writes exactly these tensors, check_llama_weights checks
// them, the loader reads each rank's slice by llama_tensor_slice, and the planner counts each
// rank's bytes by llama_rank_weight_bytes, so the four cannot drift apart.
//
// The shard rules are the engine's (parallel::HeadPlan, parallel::ShardSpec::even):
//   Replicated  every rank holds all of it: RMSNorm weights, the MoE router;
//   VocabRows   rows split near-evenly over the vocabulary (ShardSpec::even, shards may differ by
//               one row): the embedding and the LM head;
//   QHeadRows   rows split by query heads (q_proj: [q_dim, hidden] -> [q_heads/tp * head_dim, ..]);
//   KvHeadRows  rows split by KV heads (k_proj, v_proj); when tp > kv_heads each rank holds one KV
//               head, the same head on tp / kv_heads consecutive ranks (replicated), as HeadPlan;
//   QHeadCols   columns split by query heads (o_proj: [hidden, q_dim] -> [hidden, q local]);
//   FfnRows     rows split near-evenly over the tensor's FFN width (gate, up; experts' w1, w3;
//               qwen2_moe's moe_intermediate_size and shared_expert_intermediate_size);
//   FfnCols     columns split near-evenly over the tensor's FFN width (down; experts' w2).
// qwen2_moe's q/k/v biases are 1-D, split by the rows of their weights (QHeadRows, KvHeadRows),
// part Norm (f32 vectors).
// The TP sizes that fit the heads are HeadPlan's (llama_tp_problem names the others).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "parallm/core/dtype.h"
#include "parallm/core/tensor.h"
#include "parallm/model/config.h"
#include "parallm/model/weights.h"

namespace parallm {

enum class ShardRule { Replicated, VocabRows, QHeadRows, KvHeadRows, QHeadCols, FfnRows, FfnCols };

// What a tensor is part of, for accounting (the planner's per-part parameter counts).
enum class LlamaPart { Embedding, Norm, Attention, Mlp, Router, Expert, LmHead };

std::string_view shard_rule_name(ShardRule r);  // "replicated", "vocab rows", ...

struct LlamaTensor {
  std::string name;  // Hugging Face name, "model.layers.3.self_attn.q_proj.weight"
  Shape shape;       // the full tensor's
  ShardRule rule = ShardRule::Replicated;
  LlamaPart part = LlamaPart::Norm;
  int64_t layer = -1;   // decoder layer, -1 for the embedding, final norm and LM head
  int64_t expert = -1;  // MoE expert, -1 otherwise
  bool matrix = true;   // stored in the weight dtype; false: a vector the model keeps in f32
  int64_t numel() const;
};

// Every tensor of the model, in checkpoint order: the embedding; per layer input_layernorm, q, k,
// v, o, post_attention_layernorm, then gate, up, down (MoE: the router, then w1, w2, w3 of each
// expert); the final norm; lm_head, absent when tie_word_embeddings.
std::vector<LlamaTensor> llama_tensors(const ModelConfig& c);
// The tensors of decoder layer `layer` alone, in the same order.
std::vector<LlamaTensor> llama_layer_tensors(const ModelConfig& c, int64_t layer);
// lm_head.weight's entry (also when tied, for a checkpoint that stores it anyway).
LlamaTensor llama_lm_head(const ModelConfig& c);
// The entry named `name`, if the model has one.
std::optional<LlamaTensor> find_llama_tensor(const ModelConfig& c, const std::string& name);

// Why TP size `tp` cannot run this model, in the engine's words (HeadPlan::make, LlamaModel's
// empty-shard check), or "" when it can.
std::string llama_tp_problem(const ModelConfig& c, int tp);

// Why vLLM's --enable-expert-parallel layout (experts whole, placed over the TP ranks;
// LlamaOptions::experts_over_tp) cannot run this model at TP `tp` with `--ep ep`, or "" when it
// can: a dense model, --ep above 1 as well, TP above the experts.
std::string llama_expert_parallel_problem(const ModelConfig& c, int tp, int ep);

// The part of `t` that rank `tp_rank` of a TP group of `tp` holds. Throws std::invalid_argument
// (llama_tp_problem's reason) when tp does not fit the model. `experts_whole` (the
// --enable-expert-parallel layout): an expert's tensors are not split (Slice::all; which experts a
// rank holds is expert_range over the TP ranks, not this function's business).
Slice llama_tensor_slice(const LlamaTensor& t, const ModelConfig& c, int tp, int tp_rank,
                         bool experts_whole = false);
// Elements of that slice.
int64_t llama_slice_numel(const LlamaTensor& t, const Slice& s);

// What one rank holds: TP rank `tp_rank` of `tp`, EP rank `ep_rank` of `ep` (experts split over
// EP by parallel::expert_range: contiguous, the first E % EP ranks one more), pipeline stage holding layers [layer_begin, layer_end). The first stage holds
// the embedding; the last the final norm and the LM head, which is the embedding's rows again
// when tied: counted once when the same rank holds the embedding, twice (a second copy) when the
// embedding sits on another stage, as LlamaModel loads it.
struct LlamaRankShare {
  int64_t attention = 0;  // q, k, v, o slices of the stage's layers
  int64_t mlp = 0;        // dense gate, up, down slices (and qwen2_moe's shared experts)
  int64_t router = 0;     // MoE routers and shared-expert gates (replicated, f32)
  int64_t experts = 0;    // this EP rank's experts' slices
  int64_t norms = 0;      // the layers' two RMSNorms (and q/k/v biases) and, last stage, the
                          // final norm (f32)
  int64_t embedding = 0;  // first stage: the vocab slice of the embedding
  int64_t head = 0;       // last stage: the LM head's vocab slice (0 when shared with embedding)
  int64_t matrices() const { return attention + mlp + router + experts + embedding + head; }
  int64_t total() const { return matrices() + norms; }
  // Bytes: matrices at `dtype` (or `matrix_bytes` per element, 0.5 for 4-bit), norms and the MoE
  // routers in f32 (as LlamaModel keeps them).
  uint64_t bytes(DType dtype) const;
  double bytes(double matrix_bytes) const;
};
// `experts_over_tp` (--enable-expert-parallel): ep must be 1; the rank holds the whole experts
// expert_range(E, tp, tp_rank), the rest as without it.
LlamaRankShare llama_rank_share(const ModelConfig& c, int tp, int tp_rank, int64_t layer_begin,
                                int64_t layer_end, int ep = 1, int ep_rank = 0,
                                bool experts_over_tp = false);

// Bytes of weights one rank of LlamaModel holds, exactly LlamaModel::weight_bytes() (what
// `generate --mem-stats` prints): llama_rank_share(...).bytes(weight_dtype).
uint64_t llama_rank_weight_bytes(const ModelConfig& c, DType weight_dtype, int tp, int tp_rank,
                                 int64_t layer_begin, int64_t layer_end);

}  // namespace parallm
