// ParallelMlp: LLaMA's SwiGLU MLP split over a TP group by FFN rows.
//
//   xn [T, hidden] -> gu = ColumnParallel(W_gate | W_up) xn  [T, 2 ffn_local]
//                  -> h = silu(gate) * up                    [T, ffn_local]
//                  -> out = RowParallel(W_down) h            [T, hidden], one all-reduce
//
// gate and up are fused into one GEMM; its FusedShardSpec names the rows of gate_proj and up_proj
// each block holds. The FFN splits near-evenly (ShardSpec::even), so it need not divide by TP.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/parallel/linear.h"
#include "parallm/parallel/shard.h"
#include "parallm/parallel/train_mode.h"

namespace parallm::parallel {

// What the training forward keeps for the backward, what a deferred backward keeps for
// backward_weight(), and the scratch of each call; owned by the caller, one per (micro-batch,
// layer) state, reused. fl = ffn_local; T = all the tokens (also under sequence parallelism).
//
// Kept from forward_train() to backward(): gu, h.
// Kept from backward() to backward_weight() (defer_weight_grads only): h, wgrad_dgu, wgrad_dout
// (gu is free once backward() returns).
// Everything else is scratch, clobbered by each call and never read across calls: the caller may
// lend one shared set to every state.
struct MlpCache {
  // ---- kept forward -> backward
  std::vector<float> gu;   // [T, 2 fl]: each row gate | up (the column-parallel output)
  std::vector<float> h;    // [T, fl]: silu(gate) * up (down_proj's input); also kept -> W
  // ---- kept backward -> backward_weight (defer_weight_grads; empty otherwise)
  std::vector<float> wgrad_dgu;   // [T, 2 fl]: the gradient of gu
  std::vector<float> wgrad_dout;  // [T, hidden]: the output's gradient (all rows under SP)
  // ---- scratch
  std::vector<float> dh;   // [T, fl]
  std::vector<float> dgu;  // [T, 2 fl] (without defer)
  std::vector<float> xg;   // [T, hidden] under SP: the gathered input, the partial output, the
                           // partial input gradient in turn
  std::vector<float> dout; // [T, hidden] under SP without defer: the gathered output gradient
  std::vector<float> seq;  // the sequence mappings' staging (uneven row splits)
};

class ParallelMlp {
 public:
  ParallelMlp() = default;
  // gate_up: [2 * ffn.size(), hidden], this rank's gate_proj rows then its up_proj rows;
  // down: [hidden, ffn.size()], this rank's input columns of down_proj.
  ParallelMlp(RowBlocks gate_up, Tensor down, ShardSpec ffn, comm::Group group);

  // The fused gate/up rows a rank holds: parts "gate_proj", "up_proj".
  static FusedShardSpec gate_up_spec(const ShardSpec& ffn);
  // Scratch floats forward() needs for T tokens.
  static int64_t scratch_floats(const ShardSpec& ffn, int64_t T) { return T * 2 * ffn.size(); }

  // xn: [T, hidden] (the same on every rank) -> out: [T, hidden], summed over the group.
  // scratch: scratch_floats(T) floats, clobbered.
  void forward(const float* xn, int64_t T, float* scratch, float* out) const;

  // Training: forward() keeping what backward() needs in `cache`. T counts all the tokens; under
  // mode.sequence_parallel xn and out are this rank's rows [shard_of(T, group).size(), hidden]
  // (xn all-gathered before the gate/up GEMM, the output reduce-scattered).
  void forward_train(const float* xn, int64_t T, MlpCache& cache, float* out,
                     const TrainMode& mode = {}) const;
  // dout [T, hidden] (the same on every rank) -> dxn [T, hidden] summed over the group (null:
  // skipped); dgate_up [2 ffn_local, hidden] and ddown [hidden, ffn_local] += the weight
  // gradients. xn and cache as forward_train left them, with the same mode. Under
  // mode.sequence_parallel dout and dxn are this rank's rows. Under mode.defer_weight_grads only
  // dxn is computed (dgate_up and ddown untouched, may be null); backward_weight() adds them.
  void backward(const float* xn, MlpCache& cache, const float* dout, int64_t T, float* dxn,
                float* dgate_up, float* ddown, const TrainMode& mode = {}) const;
  // After backward() with mode.defer_weight_grads: dgate_up and ddown += the weight gradients,
  // bit for bit what backward() without it adds. xn as given to forward_train (gathered again
  // here under SP: collective).
  void backward_weight(const float* xn, MlpCache& cache, int64_t T, float* dgate_up, float* ddown,
                       const TrainMode& mode = {}) const;

  const ShardSpec& ffn() const { return ffn_; }
  const ColumnParallelLinear& gate_up() const { return gate_up_; }
  const RowParallelLinear& down() const { return down_; }
  const comm::Group& group() const { return group_; }

 private:
  ShardSpec ffn_;
  ColumnParallelLinear gate_up_;
  RowParallelLinear down_;
  comm::Group group_;
};

}  // namespace parallm::parallel
