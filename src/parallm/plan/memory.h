// Memory per device: how a layout shards the parameters (per pipeline stage), the KV cache, and
// activations (inference working set; for training Korthikanti et al. 2022, "Reducing Activation
// Recomputation in Large Transformer Models", with and without sequence parallelism and selective
// recomputation), gradients and optimizer states.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallm/model/config.h"
#include "parallm/plan/workload.h"

namespace parallm::plan {

// Why a layout cannot run this model at all, or "" when it can. TP sizes are the engine's
// (llama_tp_problem: HeadPlan's head rule in its words; FFN and vocabulary split unevenly, so any
// size up to them runs). Memory is not checked here.
std::string layout_problem(const ModelConfig& c, const Layout& l);

// Layers of each stage: the engine's pipeline::partition_layers (the leftover layers to the
// middle stages).
std::vector<int64_t> layers_per_stage(int64_t layers, int pp);

// KV heads each TP rank stores: kv_heads / tp, or 1 (replicated) when tp > kv_heads.
int64_t kv_heads_per_rank(const ModelConfig& c, int tp);

// Parameters one device of pipeline stage `stage` holds, by the engine's rules: the tensor table's
// shard rules (model/llama_tensors.h: near-even FFN and vocabulary shards, KV heads replicated when
// TP exceeds them), the engine's stage partition, EP applied to the experts.
struct StageParams {
  int stage = 0;
  int tp_rank = 0;
  int64_t layers = 0;
  double attention = 0;  // q, k, v, o of all the stage's layers
  double mlp = 0;        // dense MLPs, or the MoE routers (and qwen2_moe's shared experts)
  double router = 0;     // of which the MoE routers and shared-expert gates, kept in f32
  double experts = 0;    // the experts this device holds (MoE)
  double norms = 0;      // the layers' RMSNorms and, last stage, the final norm
  double embedding = 0;  // first stage: the vocab-parallel embedding slice
  double head = 0;       // last stage: the LM head's vocab slice (a copy of the embedding's rows
                         // when tied and on another stage; 0 when it shares the embedding)
  double dense() const { return attention + mlp + norms + embedding + head; }
  double total() const { return dense() + experts; }
  // Bytes for inference as the engine holds them: matrices at `matrix_bytes` per element, the
  // norms and the MoE routers in f32 (LlamaRankShare::bytes).
  double weight_bytes(double matrix_bytes) const {
    return (total() - norms - router) * matrix_bytes + (norms + router) * 4;
  }
};
// For TP rank `tp_rank` of the stage; -1: the rank holding the most (uneven shards differ).
// `ep_rank`: which EP rank's experts (parallel::expert_range: the first E % EP ranks hold one
// more, so EP rank 0 holds the most). `experts_over_tp` (or l.experts_over_tp): vLLM's
// --enable-expert-parallel layout (l.ep must be 1): whole experts placed over the TP ranks
// (llama_rank_share's rule).
StageParams stage_params(const ModelConfig& c, const Layout& l, int stage, int tp_rank = -1,
                         int ep_rank = 0, bool experts_over_tp = false);

// Weight bytes TP rank `tp_rank`, EP rank `ep_rank` of `stage` holds for inference: for f32, f16
// and bf16 exactly LlamaModel::weight_bytes() of that rank, what `parallm generate --mem-stats`
// prints (llama_rank_share, the tensor table the loader reads by).
double rank_weight_bytes(const ModelConfig& c, const Layout& l, Precision weights, int stage,
                         int tp_rank, int ep_rank = 0, bool experts_over_tp = false);

// KV cache bytes per token per device on a stage with `layers` layers:
// 2 (K and V) x layers x kv_heads_per_rank x head_dim x bytes.
double kv_bytes_per_token(const ModelConfig& c, int tp, int64_t layers, Precision kv);

// A reference count, no longer what the planner uses (activation_bytes_per_chunk is: what parallm
// keeps): activation memory of one layer for one micro-batch of b sequences of s tokens, per TP
// rank, stored for the backward pass (bf16), after Korthikanti et al. 2022 written for LLaMA
// layers with SiLU(gate) kept as well:
//   replicated across TP unless SP: the inputs of the two RMSNorms and of the QKV and gate/up
//     projections, 8 s b h bytes;
//   split by TP: Q, K, V, the attention output, gate, up, SiLU(gate), SiLU(gate)*up:
//     2 s b (2 q_dim/t + 2 kv_dim_rank + 4 ffn/t) bytes (ffn x top-k for MoE);
//   softmax output of core attention, 2 b (a/t) s^2 bytes: dropped by selective recompute;
//   full recompute keeps only the layer input, 2 s b h (/t with SP).
double activation_bytes_per_layer(const ModelConfig& c, int64_t s, int64_t b, int tp, bool sp,
                                  Recompute r);
// The paper's own formula for GPT layers (4h GeLU MLP, dropout), to check the structure against:
// no SP: s b h (10 + 24/t + 5 a s / (h t)); SP: s b h / t (34 + 5 a s / h); selective drops the
// a s term; full: 2 s b h (/t with SP).
double korthikanti_gpt_bytes_per_layer(int64_t s, int64_t b, int64_t h, int64_t a, int t, bool sp,
                                       Recompute r);

// The engine's training model (train/model.h), exactly: the bytes that one held (micro-batch,
// chunk) state keeps from its forward to its backward, what TrainModel::activation_stats() counts
// for it. f32 (4 bytes) throughout, whatever the compute dtype: the BF16 mode rounds weights, not
// activations. With T = micro_batch * seq_len tokens, T_sp = this rank's rows of them under SP
// (ShardSpec::even(T, tp, tp_rank)) else T, and this rank's heads, FFN rows and vocabulary rows by
// the engine's split (HeadPlan::make: KV heads replicated when tp > KV heads; ShardSpec::even:
// uneven FFN and vocabulary shards differ by a row, by tp_rank):
//   per layer, no recompute: x, xn1, x2, xn2 [T_sp, H]; rstd1, rstd2 [T_sp]; q, attn [T, qd];
//     k, v [T, kvd]; probs [B, hq, S, S]; gate|up [T, 2f]; h = silu(gate)*up [T, f]
//   selective: the same without probs;  full: x [T_sp, H] only
//   the chunk with the head adds xlast, xf [T_sp, H], rstdf [T_sp], dlogits [T, V_local]
// Scratch that no state owns (the QKV GEMM output, backward and recompute buffers, the logits) is
// not counted; neither is what the zero-bubble split keeps between B and W. docs/
// parallelism-guide.md derives it. Throws std::invalid_argument naming the field out of range.
struct ActivationShape {
  int64_t micro_batch = 1, seq_len = 1;
  int tp = 1, tp_rank = 0;
  bool sequence_parallel = false;
  int recompute = 0;   // 0 none, 1 selective, 2 full
  int64_t layers = 0;  // layers in the chunk
  bool head = false;   // the chunk has the final norm, LM head and loss
};
int64_t activation_bytes_per_chunk(const ModelConfig& c, const ActivationShape& a);
// ZB-H1's split backward (TrainMode::defer_weight_grads): what the state keeps from its B (the
// input gradient) to its W (the weight gradients), whatever the recompute mode:
//   per layer: xn1, xn2 [T_sp, H] (the norm outputs, inputs of QKV and gate|up); attn [T, qd] and
//     h [T, f] (inputs of o_proj and down_proj); the gradients of the QKV output [T, qd + 2 kvd],
//     of gate|up [T, 2f], and of the attention's and the MLP's outputs [T, H] each (all rows)
//   the head's chunk: xf [T_sp, H], dlogits [T, V_local];  the embedding's chunk (`embedding`):
//     the embedding output's gradient [T_sp, H]
int64_t weight_grad_bytes_per_chunk(const ModelConfig& c, const ActivationShape& a, bool embedding);

// One TP rank's held activation bytes per local model chunk of pipeline stage `stage` under `w`
// (activation_bytes_per_chunk at w.precision's bytes per value: x 1 for f32, x 1/2 for 16 bits):
// chunk c is virtual stage c * pp + stage; the virtual stages' layers are the engine's
// pipeline::partition_layers(layers, pp * chunks); the last virtual stage has the head.
// `after_input`: what each chunk keeps between ZB's B and W (weight_grad_bytes_per_chunk).
std::vector<double> chunk_activation_bytes(const ModelConfig& c, const Layout& l,
                                           const TrainingWorkload& w, int chunks, int stage,
                                           int tp_rank, bool after_input = false);

// What a pipeline stage's (fullest TP rank's) held activations come to under a schedule.
struct StageActivations {
  int stage = 0;
  double per_micro_batch = 0;  // one micro-batch through all the stage's chunks
  double peak_bytes = 0;       // the most held at once: what TrainModel's peak_bytes measures
  int peak_states = 0;         // the most (micro-batch, chunk) states held at once
  // Working buffers no state owns, for the fit check only (not in peak_bytes): one layer's full
  // state (the layer being differentiated or recomputed) and, on the head's stage, the logits.
  double scratch = 0;
};
// Walks each stage's action list of `s` (the lists the executor runs): a chunk's bytes are held
// from its Forward to its Backward; under a split backward (zb-h1) they shrink at its
// BackwardInput to what W needs and go at its BackwardWeight. For every stage of `l`
// (s.stages == l.pp).
std::vector<StageActivations> stage_activations(const ModelConfig& c, const Layout& l,
                                                const TrainingWorkload& w,
                                                const pipeline::Schedule& s);

struct MemoryBreakdown {
  int stage = 0;  // the stage this is for (the fullest one when summarised)
  double weights = 0, kv_cache = 0, activations = 0, gradients = 0, optimizer = 0;
  double total() const { return weights + kv_cache + activations + gradients + optimizer; }
};

// Inference on the fullest device of `stage`: weights (rank_weight_bytes), the KV cache of the
// replica's sequences at full length (prompt + output), and the engine's prefill working set for
// one micro-batch of `micro_batch` prompts in one step: its workspace (LlamaModel::workspace_bytes)
// plus the residual stream, and the last stage's logits, all f32.
MemoryBreakdown inference_memory(const ModelConfig& c, const Layout& l, const InferenceWorkload& w,
                                 int stage, int64_t replica_batch, int64_t micro_batch);

// Training on one device of `stage`: w.precision FP32 (parallm's engine): f32 weights and
// gradients, Adam m and v (8 bytes/param; SGD's momentum 4); 16 bits: mixed precision as in ZeRO,
// bf16 weights and gradients, fp32 master weights + Adam m and v (12 bytes/param; SGD with
// momentum 8); sharded over DP by the ZeRO stage (experts over their DP/EP group). Activations:
// `in_flight` micro-batches through the stage's chunks (StageActivations::per_micro_batch; the
// schedule's peak for this stage) plus the scratch (StageActivations::scratch).
MemoryBreakdown training_memory(const ModelConfig& c, const Layout& l, const TrainingWorkload& w,
                                int stage, double in_flight);

}  // namespace parallm::plan
