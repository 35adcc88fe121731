// The LLaMA architecture (also Mistral-7B-style and TinyLlama configs) built from the parallel
// layers, for one rank: its tensor-parallel shard of its pipeline stage's layers.
//
// Per decoder layer:  x += ParallelAttention(rmsnorm(x))   (parallel/attention.h)
//                     x += ParallelMlp(rmsnorm(x))         (parallel/mlp.h)
// or, for a mixture-of-experts config (Mixtral), x += MoeLayer(rmsnorm(x)) (parallel/moe.h), its
// experts split over LlamaOptions::ep and each expert's FFN over TP (or, experts_over_tp, whole
// experts placed over the TP ranks); qwen2_moe adds a shared
// expert, x += MoeLayer(xn) + sigmoid(xn . w_sg) * SharedMlp(xn), the shared expert a dense
// ParallelMlp on every EP rank, and q/k/v biases in the attention.
// so a layer costs exactly two all-reduces forward when TP > 1 (none when TP == 1). The model
// holds the norms and the residual adds; every split and every collective is in the layers.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/model/config.h"
#include "parallm/model/weights.h"
#include "parallm/model/workspace.h"
#include "parallm/parallel/attention.h"
#include "parallm/parallel/embedding.h"
#include "parallm/parallel/lm_head.h"
#include "parallm/parallel/mlp.h"
#include "parallm/parallel/moe.h"
#include "parallm/parallel/shard.h"

namespace parallm {

// The KV store and the batch's chunks are the attention layer's (parallel/attention.h).
using parallel::KvStore;
using parallel::SeqChunk;

struct LlamaOptions {
  DType weight_dtype = DType::BF16;  // matrices and embeddings; norms are always f32
  // Matrices the source holds block-quantized (a GGUF's Q8_0, Q4_0, ...) stay so, whatever
  // weight_dtype says: linear layers run the quantized GEMV, the embedding dequantizes at lookup.
  bool keep_quantized = true;
  int64_t layer_begin = 0;           // this rank's pipeline stage: layers [layer_begin, layer_end)
  int64_t layer_end = -1;            // -1: to the last layer
  // Mixture of experts: the expert-parallel group (size 1: every expert here). Its ranks hold the
  // same tokens (attention replicated); each holds parallel::expert_range's experts.
  comm::Group ep;
  // vLLM's --enable-expert-parallel layout: the experts are not TP-split but placed whole over the
  // TP group (expert_range(E, TP, tp_rank)), which is the EP group; the MoE layer all-reduces its
  // [T, k, H] slots over it (parallel::MoeMode::AllReduce). Attention, the LM head and qwen2_moe's
  // shared expert stay TP-split as for a dense model; the routers are on every rank. `ep` must be
  // size 1; a dense model is refused.
  bool experts_over_tp = false;
};

class LlamaModel {
 public:
  // Reads this rank's slices from `source` (and only those). `tp` is the tensor-parallel group.
  LlamaModel(const ModelConfig& config, const WeightSource& source, comm::Group tp,
             LlamaOptions options = {});

  const ModelConfig& config() const { return config_; }
  bool has_embedding() const { return opts_.layer_begin == 0; }
  bool has_head() const { return opts_.layer_end == config_.num_hidden_layers; }
  int64_t layer_begin() const { return opts_.layer_begin; }
  int64_t layer_end() const { return opts_.layer_end; }
  int64_t local_layers() const { return opts_.layer_end - opts_.layer_begin; }
  const parallel::HeadPlan& heads() const { return heads_; }
  const parallel::ShardSpec& vocab_shard() const { return vocab_; }
  int64_t local_kv_dim() const { return heads_.kv_heads * config_.head_dim; }

  // ids: [T] -> x: [T, hidden]. First stage only.
  void embed(const int32_t* ids, int64_t T, float* x) const;
  // x: [T, hidden], the tokens of `chunks` back to back, through this rank's layers, in place.
  // Writes their keys and values into `kv` and reads the earlier positions from it. `ws` is the
  // caller's workspace (make_workspace); throws std::invalid_argument when T exceeds its
  // max_tokens() or it was made for another model shape. `after_layer`, when set, sees x after
  // each layer (its global index), e.g. to find where non-finite values first appear.
  using LayerHook = std::function<void(int64_t layer, const float* x, int64_t T)>;
  void forward_layers(float* x, const std::vector<SeqChunk>& chunks, KvStore& kv, Workspace& ws,
                      const LayerHook& after_layer = nullptr) const;
  // x: [R, hidden] -> logits: [R, vocab_shard().size()] (final norm, then this rank's vocab
  // slice of the LM head). Last stage only. x is normalised in place.
  void head(float* x, int64_t R, float* logits) const;
  // The vocab-parallel LM head (its gather of full logits and the sampler's exchanges). Last stage
  // only: throws std::invalid_argument elsewhere.
  const parallel::VocabParallelLmHead& lm_head() const;

  // Bytes of weights this rank holds, and the bytes a decode step reads (every matrix once; the
  // embedding contributes one row; MoE experts at k / E of their bytes).
  uint64_t weight_bytes() const { return weight_bytes_; }
  // MoE: rows (token, expert pairs) each expert multiplied on this rank, summed over its layers,
  // [num_local_experts] (0 for the experts it does not hold); empty for a dense model.
  std::vector<int64_t> moe_expert_rows() const;
  // MoE: rows this rank sent to each EP rank (its own included), summed over its layers, [ep];
  // empty for a dense model. The planner's all-to-all bytes are exact given these (plan/moe.h).
  std::vector<int64_t> moe_rows_sent() const;
  // MoE: the group the experts are placed over (LlamaOptions::ep, or a group of the TP ranks named
  // "ep_tp" under experts_over_tp), and whether it is the TP group's ranks.
  const comm::Group& expert_group() const { return expert_group_; }
  bool experts_over_tp() const { return opts_.experts_over_tp; }
  uint64_t decode_bytes_per_token() const;

  // The workspace forward_layers needs for up to max_tokens tokens per call (the largest prompt
  // chunk, or the batch's tokens in one step). The same for every pipeline stage: layers run one
  // at a time and reuse it.
  Workspace make_workspace(int64_t max_tokens) const;
  static WorkspaceLayout workspace_layout(const ModelConfig& config, int tp_size, int tp_rank);
  // Bytes of that workspace, without building the model or allocating (for the planner).
  static uint64_t workspace_bytes(const ModelConfig& config, int tp_size, int tp_rank,
                                  int64_t max_tokens);

 private:
  struct Layer {
    std::vector<float> attn_norm, ffn_norm;
    parallel::ParallelAttention attention;
    parallel::ParallelMlp mlp;  // dense models
    parallel::MoeLayer moe;     // mixture-of-experts models
    parallel::ParallelMlp shared;    // qwen2_moe's shared expert (TP-split, on every EP rank)
    std::vector<float> shared_gate;  // its gate [hidden] (f32), empty without a shared expert
    bool is_moe = false;
    uint64_t bytes() const;  // weights, norms included
  };

  ModelConfig config_;
  LlamaOptions opts_;
  comm::Group tp_;
  comm::Group expert_group_;  // MoE: opts_.ep, or the TP ranks' own group (experts_over_tp)
  parallel::HeadPlan heads_;
  parallel::ShardSpec ffn_, vocab_;
  parallel::ShardSpec experts_;  // this EP rank's experts (MoE)
  parallel::ShardSpec expert_ffn_, shared_ffn_;  // this TP rank's rows of an expert, shared expert
  WorkspaceLayout workspace_layout_;  // what forward_layers needs of a workspace, per token
  std::vector<Layer> layers_;
  parallel::VocabParallelEmbedding embedding_;
  parallel::VocabParallelLmHead lm_head_;  // shares the embedding's storage when tied
  std::vector<float> final_norm_;
  uint64_t weight_bytes_ = 0;
};

}  // namespace parallm
