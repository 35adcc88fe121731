// TrainModel: the LLaMA architecture with a backward pass, for one rank: its tensor-parallel
// shard of the whole model (pipeline stages come with the 3D-training issue). Built from the
// layers in parallel/ and their backwards (parallel/*.h), so the TP backward is the mappings'
// conjugates: column-parallel inputs' gradients are all-reduced (copy_to_region backward),
// row-parallel outputs' gradients pass through (reduce_from_region backward), and the
// cross-entropy is vocab-parallel (the logits are never gathered).
//
// Parameters and gradients live in a ParamStore (params.h); the layers hold views of its values.
// Activations of one micro-batch are kept from forward to backward (no recomputation yet).
//
// K/V heads that TP replicates (TP > KV heads): each replica's k_proj / v_proj gradient is summed
// over the ranks holding the same head inside the backward (ColumnParallelLinear::backward), so
// the replicas hold identical gradients and Param::tp_replicas says how many there are.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "parallm/comm/group.h"
#include "parallm/core/dtype.h"
#include "parallm/model/config.h"
#include "parallm/train/params.h"

namespace parallm::train {

struct TrainModelOptions {
  // F32: everything in f32 (the reference); the layers view the master values directly.
  // BF16: the forward and the input-gradient products use copies of the matrices rounded to bf16
  // (held as f32 values that bf16 represents exactly; refreshed from the f32 masters by
  // refresh_compute_weights()); activations, gradients, norm weights, master weights and
  // optimizer state stay f32.
  DType compute = DType::F32;
  int threads = 1;  // informational; kernels use the calling rank's ThreadPool
};

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

  // The forward alone (evaluation): the sum of the cross-entropies. Collective over TP.
  double loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S);

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
