// TrainModel: the LLaMA architecture with a backward pass, for one rank: its tensor-parallel
// shard of its pipeline stage's model chunks (the whole model at PP 1). Built from the
// layers in parallel/ and their backwards (parallel/*.h), so the TP backward is the mappings'
// conjugates: column-parallel inputs' gradients are all-reduced (copy_to_region backward),
// row-parallel outputs' gradients pass through (reduce_from_region backward), and the
// cross-entropy is vocab-parallel (the logits are never gathered).
//
// Parameters and gradients live in a ParamStore (params.h); the layers hold views of its values.
// Under pipeline parallelism a rank holds one or more model chunks (layer ranges); each
// micro-batch's activations are kept per (micro-batch, chunk) from its forward to its backward,
// as many at once as the schedule has in flight (pipeline/schedule.h).
//
// K/V heads that TP replicates (TP > KV heads): each replica's k_proj / v_proj gradient is summed
// over the ranks holding the same head inside the backward (ColumnParallelLinear::backward), so
// the replicas hold identical gradients and Param::tp_replicas says how many there are.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/dtype.h"
#include "parallm/model/config.h"
#include "parallm/parallel/train_mode.h"
#include "parallm/pipeline/partition.h"
#include "parallm/train/params.h"

namespace parallm::train {

// Activation recomputation (--recompute): none keeps every activation of a micro-batch from its
// forward to its backward; selective drops the attention's softmax probabilities (recomputed from
// q and k); full keeps only each layer's input and runs the layer's forward again just before its
// backward. The results are bit for bit the same in every mode.
using parallel::parse_recompute;
using parallel::Recompute;
using parallel::recompute_name;

struct TrainModelOptions {
  // F32: everything in f32 (the reference); the layers view the master values directly.
  // BF16: the forward and the input-gradient products use copies of the matrices rounded to bf16
  // (held as f32 values that bf16 represents exactly; refreshed from the f32 masters by
  // refresh_compute_weights()); activations, gradients, norm weights, master weights and
  // optimizer state stay f32.
  DType compute = DType::F32;
  int threads = 1;  // informational; kernels use the calling rank's ThreadPool
  // Pipeline: the layer ranges of this rank's model chunks, in local chunk order (chunk c is the
  // virtual stage c * pp + pp_rank; pipeline/schedule.h). Empty: one chunk holding every layer.
  // Virtual stage 0 runs the embedding; the last virtual stage runs the final norm, the LM head
  // and the cross-entropy. has_embedding / has_head say whether local chunk 0 / chunk chunks-1
  // are those (set by pipeline_chunks()). The ParamStore must hold these tensors
  // (stage_tensors(options)).
  std::vector<pipeline::StageLayers> chunks;
  bool has_embedding = true;  // local chunk 0 is virtual stage 0
  bool has_head = true;       // the last local chunk is the last virtual stage
  // --sp (sequence_parallel: no effect at TP 1), the ZB split (defer_weight_grads); selective
  // recomputation is `recompute` (it sets the layers' recompute_probs).
  parallel::TrainMode mode;
  Recompute recompute = Recompute::None;
  // Mixture of experts (Mixtral): the expert-parallel group (the EP ranks are data-parallel ranks
  // of the same TP rank, each with its own micro-batches; docs/moe.md "Training"). Size 1: every
  // expert here. The parameter store holds every expert's tensors on every EP rank; a rank
  // computes (and adds gradients to) only its experts [expert_range(E, ep, rank)).
  comm::Group ep;
  // The weight of a micro-batch's load-balancing loss in the step's loss, before
  // router_aux_loss_coef: 1 / (micro-batches in the global batch), so the step adds the mean of
  // the micro-batches' aux losses, as gradient accumulation over Hugging Face's per-forward loss
  // does.
  double aux_scale = 1.0;
};

// The layer ranges and embedding/head flags of pipeline rank `pp_rank` of `pp` with `v` chunks
// per stage, from the per-virtual-stage layer ranges (pipeline::partition_layers over pp * v).
TrainModelOptions pipeline_chunks(TrainModelOptions base,
                                  const std::vector<pipeline::StageLayers>& virtual_stages, int pp,
                                  int pp_rank, int v);
// The tensors a ParamStore needs for a model built with `options` (its chunks' layers, the
// embedding and the head as the flags say).
StageTensors stage_tensors(const TrainModelOptions& options);

class TrainModel {
 public:
  // `params` must be a ParamStore for (config, tp.size(), tp.rank()) and outlive the model.
  // Throws std::invalid_argument naming the reason when TP size does not fit the model.
  TrainModel(const ModelConfig& config, ParamStore& params, comm::Group tp,
             TrainModelOptions options = {});
  ~TrainModel();

  const ModelConfig& config() const;
  ParamStore& params();

  // One micro-batch of B sequences of S tokens: inputs and targets [B * S], row-major by sequence.
  // Runs the forward, and the backward of `grad_scale * (sum of the B*S cross-entropies)`, adding
  // into params().grads() (accumulates over calls; the caller zeroes). Returns the sum of the
  // B*S cross-entropies (natural log), the same on every TP rank. Collective over the TP group.
  // Throws std::invalid_argument naming the id when an input or target is outside the vocabulary.
  double forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S,
                          float grad_scale);

  // MoE: the load-balancing loss of the last forward (its micro-batch, every MoE layer of the
  // chunk), as Hugging Face's load_balancing_loss_func computes it over the concatenated router
  // logits: E * sum_e f_e P_e, f_e = (tokens whose top-k holds e) / N, P_e = (sum of p_e over
  // the tokens) / N, N = tokens x MoE layers; before router_aux_loss_coef. 0 for a dense model.
  // Its gradient (scaled by router_aux_loss_coef x options.aux_scale) is added by the backward.
  double last_aux_loss() const;

  // The forward alone (evaluation): the sum of the cross-entropies. Collective over TP.
  // PP = 1 only (one chunk holding the embedding and the head).
  double loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S);

  // ---- the pipeline's per-chunk calls (pipeline/executor.h drives them) ----
  // Micro-batch `mb` (any int key, unique among those in flight) through local chunk `chunk`.
  // inputs/targets [B * S] are read by the chunk that has the embedding / the head (every rank
  // may pass them). x_in: the previous virtual stage's output (null on the embedding's chunk);
  // x_out: this chunk's output for the next virtual stage (null on the head's chunk). Activations
  // are [activation_rows(B, S), hidden]: all B*S rows, or this TP rank's rows under SP.
  // Keeps what the backward needs (per the recompute mode) under the key (mb, chunk) until
  // backward/backward_weight releases it. Returns the sum of the cross-entropies on the head's
  // chunk (its backward scaled by grad_scale), else 0. Collective over TP.
  double forward(int mb, int chunk, const int32_t* inputs, const int32_t* targets, int64_t B,
                 int64_t S, float grad_scale, const float* x_in, float* x_out);
  // The whole backward of (mb, chunk): dy: the gradient of x_out from the next virtual stage
  // (null on the head's chunk); dx: the gradient of x_in for the previous one (null on the
  // embedding's chunk). Adds the weight gradients into params().grads(). `last`: the step's last
  // micro-batch for this chunk, so its parameters' gradients are complete: the grad-ready hook
  // fires for them (and only then). Releases (mb, chunk)'s activations.
  void backward(int mb, int chunk, const float* dy, float* dx, bool last);
  // ZB-H1's split (needs options.mode.defer_weight_grads): B computes dx only and keeps what W
  // needs; W adds the weight gradients (the hook fires for the chunk's parameters when `last`)
  // and releases (mb, chunk). Norm weights' gradients are added in B; the matrices', the LM
  // head's and the embedding's in W (B keeps the embedding output's gradient for it). B then W is
  // bit for bit backward(); backward() of a model built with the split runs B then W.
  // Under SP the norm weights' gradients are summed over TP as each backward adds them (each
  // rank sees its own rows), so they are complete before the hook fires.
  void backward_input(int mb, int chunk, const float* dy, float* dx);
  void backward_weight(int mb, int chunk, bool last);

  // Drops (mb, chunk)'s state without its backward (evaluation through a pipeline: forward, then
  // discard; its loss is forward's return); discard_all() drops every state in flight (after a
  // step that failed midway). Local, no communication.
  void discard(int mb, int chunk);
  void discard_all();

  int64_t activation_rows(int64_t B, int64_t S) const;  // B*S, or this rank's rows under SP
  int chunks() const;
  bool has_embedding() const;
  bool has_head() const;

  // Measured activation memory: what the held (mb, chunk) states occupy now (bytes of the
  // vectors' sizes, not capacity; scratch that no state owns is not counted), the most at once
  // since reset_stats(), and the most (mb, chunk) states held at once. Per state, f32, T = B*S:
  // per layer x, xn1, x2, xn2 [T, H], rstd1, rstd2 [T], q, attn [T, qd], k, v [T, kvd], probs
  // [B, hq, S, S], the MLP's gu [T, 2f] and h [T, f] (qd, kvd, hq, f: this rank's); selective
  // drops probs; full keeps x only. The head's chunk adds xlast, xf [T, H], rstdf [T] and dlogits
  // [T, V_local]. Under SP the x, xn1, x2, xn2, rstd, xlast, xf, rstdf rows are this rank's
  // (T_sp = activation_rows()). ZB, between B and W: per layer xn1, xn2 [T_sp, H], attn [T, qd],
  // dqkv [T, qd + 2 kvd], the attention's and the MLP's output gradients [T, H] each, h [T, f],
  // dgu [T, 2f]; the head's chunk xf [T_sp, H] and dlogits; the embedding's chunk its output's
  // gradient [T_sp, H]. Not counted: the input ids and RoPE positions (int32 [T]), and loss()'s
  // state. forward_backward() holds one state while it runs.
  struct ActivationStats {
    int64_t held_bytes = 0, peak_bytes = 0;
    int in_flight = 0, peak_in_flight = 0;  // (mb, chunk) states held
  };
  ActivationStats activation_stats() const;
  void reset_stats();

  // Called (when set) during backward as soon as a parameter's gradient for this micro-batch is
  // complete, in the order the backward finishes them (last layer first), so a data-parallel
  // reducer can start on a bucket while the backward goes on.
  using GradReadyHook = std::function<void(const Param&)>;
  void set_grad_ready_hook(GradReadyHook hook);

  // After the optimizer changed the values (BF16 compute: re-round the bf16 copies).
  void refresh_compute_weights();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Every tensor of the model whole, gathered over the TP group from each rank's slices in
// `params` (values, or with `grads` the gradients): on TP rank 0 the full tensors in
// checkpoint order, named as Hugging Face names them; on the other ranks an empty vector.
// Collective over `tp`. For checkpoints and tests.
std::vector<std::pair<std::string, Tensor>> gather_full_tensors(const ParamStore& params,
                                                                const comm::Group& tp,
                                                                bool grads = false);

// A random initialisation that does not depend on the layout: each full tensor is drawn from a
// generator seeded by (seed, tensor index); matrices and embeddings normal(0, 0.02) (GPT-2's and
// LLaMA's init), o_proj and down_proj normal(0, 0.02 / sqrt(2 * layers)), norm weights 1. Fills
// this rank's slices of `params`.
// The generator is counter-based, so a rank draws only its slice: element j (row-major index in
// the full tensor) of tensor i (its index in llama_tensors(config)) is std * z, with
// key = splitmix64(seed) ^ splitmix64(0x5eed0000 + i), u(n) = ((splitmix64(key ^ splitmix64(n))
// >> 11) + 1) * 2^-53 and z = sqrt(-2 ln u(2*(j/2))) * (j even ? cos : sin)(2 pi u(2*(j/2)+1))
// (Box-Muller, in double, rounded to f32). Gathered full tensors are bitwise the same at any TP.
void init_params(ParamStore& params, const ModelConfig& config, uint64_t seed);

}  // namespace parallm::train
