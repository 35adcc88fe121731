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

namespace parallm::parallel {

// What the training forward keeps for the backward (and the backward's scratch); owned by the
// caller, one per layer, reused across micro-batches.
struct MlpCache {
  std::vector<float> gu;   // [T, 2 ffn_local]: each row gate | up (the column-parallel output)
  std::vector<float> h;    // [T, ffn_local]: silu(gate) * up (down_proj's input)
  std::vector<float> dh;   // backward scratch [T, ffn_local]
  std::vector<float> dgu;  // backward scratch [T, 2 ffn_local]
};

class ParallelMlp {
 public:
  ParallelMlp() = default;
  // gate_up: [2 * ffn.size(), hidden], this rank's gate_proj rows then its up_proj rows;
  // down: [hidden, ffn.size()], this rank's input columns of down_proj.
  ParallelMlp(Tensor gate_up, Tensor down, ShardSpec ffn, comm::Group group);

  // The fused gate/up rows a rank holds: parts "gate_proj", "up_proj".
  static FusedShardSpec gate_up_spec(const ShardSpec& ffn);
  // Scratch floats forward() needs for T tokens.
  static int64_t scratch_floats(const ShardSpec& ffn, int64_t T) { return T * 2 * ffn.size(); }

  // xn: [T, hidden] (the same on every rank) -> out: [T, hidden], summed over the group.
  // scratch: scratch_floats(T) floats, clobbered.
  void forward(const float* xn, int64_t T, float* scratch, float* out) const;

  // Training: forward() keeping what backward() needs in `cache`.
  void forward_train(const float* xn, int64_t T, MlpCache& cache, float* out) const;
  // dout [T, hidden] (the same on every rank) -> dxn [T, hidden] summed over the group (null:
  // skipped); dgate_up [2 ffn_local, hidden] and ddown [hidden, ffn_local] += the weight
  // gradients. xn and cache as forward_train left them.
  void backward(const float* xn, MlpCache& cache, const float* dout, int64_t T, float* dxn,
                float* dgate_up, float* ddown) const;

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
