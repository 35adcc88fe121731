// The trainable parameters of one rank: every tensor of the LLaMA table (model/llama_tensors.h)
// that this rank holds, as f32 master copies in one flat buffer, with the gradients in a second
// flat buffer of the same layout. One flat buffer makes the data-parallel work simple: gradient
// buckets are ranges of it, ZeRO-1 shards it by range over DP, and the global gradient norm is one
// pass over it.
//
// Order: the checkpoint order of llama_tensors(config) (embedding, layers, final norm, lm_head when
// untied); each tensor holds this rank's TP slice (llama_tensor_slice). Offsets are multiples of
// 16 floats (64 bytes), so every tensor starts aligned, except inside the fused groups: k_proj
// follows q_proj and v_proj follows k_proj directly, up_proj follows gate_proj directly, so the
// fused column-parallel layers (q|k|v, gate|up) are one contiguous view of the buffer.
//
// Mixture of experts (Mixtral): the routers are ordinary (replicated) parameters; every expert's
// w1, w2, w3 (Param::expert) come after all the other parameters, in checkpoint order, so the
// experts are one range of the flat buffers [expert_begin(), size()). Under expert parallelism
// (EP > 1) a rank holds only its experts (parallel::expert_range), and that range is reduced over
// the expert-data-parallel group while the rest is reduced over all data ranks (train/trainer.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallm/core/tensor.h"
#include "parallm/model/config.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/partition.h"

namespace parallm::train {

struct Param {
  LlamaTensor tensor;  // Hugging Face name, full shape, shard rule
  Slice slice;         // this rank's part (Slice::all() when the rule is Replicated)
  Shape local_shape;   // the slice's shape
  int64_t offset = 0;  // in floats, into ParamStore::values() / grads()
  int64_t numel = 0;
  bool decay = false;  // AdamW weight decay: 2-D tensors (embeddings, linear weights), not norms
  // Whether every rank of the TP group holds the same values (norm weights, and K/V rows that TP
  // replicates when TP > KV heads). The global gradient norm counts such a tensor once, a sharded
  // tensor's slices once each.
  bool tp_replicated = false;
  // How many ranks of the TP group hold these same values: tp for Replicated tensors, the KV
  // heads' replica count for K/V rows that TP replicates, else 1. A TP-wide sum over parameters
  // (the global gradient norm) counts this rank's part exactly once when it adds it on the ranks
  // with tp_rank % tp_replicas == 0 (the replicas of a KV head are consecutive ranks). Counting
  // tp_replicated tensors on TP rank 0 alone would miss the KV heads that rank 0 does not hold.
  int tp_replicas = 1;
  // Pipeline with tied embeddings: the last stage's copy of the embedding (the LM head's weight),
  // whose gradient is summed with the first stage's and whose values equal it. The global
  // gradient norm counts the embedding on the first stage only.
  bool tied_copy = false;
  // An MoE expert's tensor (w1, w2, w3): held by one EP rank of each EP group.
  bool expert = false;
  bool counts_once(int tp_rank) const { return !tied_copy && tp_rank % tp_replicas == 0; }
};

// Which tensors of the model a rank holds under pipeline parallelism: the layers of its chunks,
// the embedding on the first virtual stage, the final norm and the LM head on the last (with tied
// embeddings the last stage holds the embedding as the head, marked tied_copy unless it is also
// the first). Default: everything (PP = 1).
struct StageTensors {
  std::vector<pipeline::StageLayers> layers;  // empty: every layer
  bool embedding = true, head = true;
  bool holds_layer(int64_t layer) const;
};

// The layout ParamStore(config, tp, tp_rank, stage) has (params with offsets); `size` gets the
// floats of each flat buffer. Throws std::invalid_argument (llama_tp_problem's reason) when tp
// does not fit.
// ep / ep_rank: the expert-parallel position (only experts expert_range(E, ep, ep_rank) held).
std::vector<Param> param_layout(const ModelConfig& config, int tp, int tp_rank, int64_t* size,
                                const StageTensors& stage = {}, int ep = 1, int ep_rank = 0);

class ParamStore {
 public:
  ParamStore() = default;
  // The layout of every tensor of `config` that TP rank `tp_rank` of `tp` holds; values and grads
  // zero-filled.
  ParamStore(const ModelConfig& config, int tp, int tp_rank, const StageTensors& stage = {},
             int ep = 1, int ep_rank = 0);

  const std::vector<Param>& params() const { return params_; }
  const ModelConfig& config() const { return config_; }
  int tp() const { return tp_; }
  int tp_rank() const { return tp_rank_; }
  const StageTensors& stage() const { return stage_; }
  int ep() const { return ep_; }
  int ep_rank() const { return ep_rank_; }
  // Where the experts' range of the flat buffers starts (size() when there is none).
  int64_t expert_begin() const { return expert_begin_; }
  const Param& find(const std::string& name) const;  // throws std::invalid_argument naming it
  int64_t size() const { return size_; }             // floats in each flat buffer (with padding)

  float* values() { return values_.data<float>(); }
  const float* values() const { return values_.data<float>(); }
  float* grads() { return grads_.data<float>(); }
  const float* grads() const { return grads_.data<float>(); }
  float* value(const Param& p) { return values() + p.offset; }
  const float* value(const Param& p) const { return values() + p.offset; }
  float* grad(const Param& p) { return grads() + p.offset; }
  const float* grad(const Param& p) const { return grads() + p.offset; }

  void zero_grads();
  // Fills every value from `source` (this rank's slices, converted to f32).
  void load(const WeightSource& source);

 private:
  ModelConfig config_;
  int tp_ = 1, tp_rank_ = 0, ep_ = 1, ep_rank_ = 0;
  int64_t expert_begin_ = 0;
  StageTensors stage_;
  std::vector<Param> params_;
  int64_t size_ = 0;
  Tensor values_, grads_;  // f32 [size_]
};

}  // namespace parallm::train
