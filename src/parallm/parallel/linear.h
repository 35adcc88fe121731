// The tensor-parallel linear layers, named as in MLX and Megatron.
//
// ColumnParallelLinear ("all-to-sharded"): W [out, in] split by output features; every rank gets
// the same input and produces its slice of the output. No communication forward.
// RowParallelLinear ("sharded-to-all"): W split by input features; each rank multiplies its slice
// of the input and one all-reduce sums the partial outputs (reduce_from_region, see
// parallel/mappings.h).
//
// Each takes its weight already sliced (the loader reads only the rank's bytes). The backward
// passes (training, f32 weights) are Megatron's copy / reduce pairs: column's all-reduces the
// input gradient over the group, row's needs no communication.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/parallel/shard.h"

namespace parallm::parallel {

// A column-parallel weight given as row blocks stacked in order (fused Q/K/V: q, k, v). Blocks of
// one dtype are fused into one tensor (one GEMM); blocks of different dtypes, as a GGUF written
// by llama.cpp's Q4_K_M holds them (q and k in Q4_K, v in Q6_K in some layers), stay apart and are
// multiplied one by one into their columns of the output. A Tensor converts to one block.
struct RowBlocks {
  std::vector<Tensor> blocks;
  RowBlocks(Tensor t) : blocks{std::move(t)} {}               // NOLINT(google-explicit-constructor)
  RowBlocks(std::vector<Tensor> b) : blocks(std::move(b)) {}  // NOLINT
};

// Stacks 2-D tensors of one dtype and width by rows; a mix of dtypes or widths is an error.
Tensor concat_rows(const std::vector<Tensor>& parts);

class ColumnParallelLinear {
 public:
  ColumnParallelLinear() = default;
  // weight: [out_shard.size(), in], this rank's rows: the blocks of out_shard, back to back.
  ColumnParallelLinear(RowBlocks weight, FusedShardSpec out_shard, comm::Group group);
  // x: [T, in] (the same on every rank) -> y: [T, out_shard.size()] (this rank's output columns).
  void forward(const float* x, int64_t T, float* y) const;
  // Backward of forward(x) -> y, with dy: [T, out_shard.size()].
  // dw [out_shard.size(), in] += dy^T . x (skipped when null). Parts with replicas > 1 (K/V heads
  // that TP replicates) get their weight gradient summed over the ranks holding the same rows (an
  // all-reduce of a full-size buffer of that part), so every replica adds the true gradient.
  // dx [T, in] = dy . W summed over the group (copy_to_region's backward; skipped when null).
  // Collective over the group when dx is set or a part is replicated. F32 weight only.
  void backward(const float* x, const float* dy, int64_t T, float* dx, float* dw) const;
  // The two halves of backward(), for the zero-bubble split (backward() is backward_weight() then
  // backward_input(), bit for bit). backward_input: dx [T, in] = dy . W, summed over the group
  // when `reduce` (copy_to_region's backward), else this rank's partial sum (the caller maps it,
  // e.g. a reduce-scatter under sequence parallelism). backward_weight: dw += dy^T . x with the
  // replicated parts summed over the group (collective when a part is replicated).
  void backward_input(const float* dy, int64_t T, float* dx, bool reduce = true) const;
  void backward_weight(const float* x, const float* dy, int64_t T, float* dw) const;
  // The fused weight; undefined when the row blocks have different dtypes (blocks() then).
  const Tensor& weight() const { return weight_; }
  const std::vector<Tensor>& blocks() const { return blocks_; }  // empty when fused
  int64_t out_features() const { return out_shard_.size(); }
  int64_t in_features() const { return in_; }
  size_t weight_bytes() const;
  const FusedShardSpec& out_shard() const { return out_shard_; }
  const comm::Group& group() const { return group_; }

 private:
  Tensor weight_;
  std::vector<Tensor> blocks_;  // row blocks of different dtypes (weight_ undefined)
  int64_t in_ = 0;
  FusedShardSpec out_shard_;
  comm::Group group_;
};

class RowParallelLinear {
 public:
  RowParallelLinear() = default;
  // weight: [out, in_shard.size()], this rank's columns.
  RowParallelLinear(Tensor weight, ShardSpec in_shard, comm::Group group);
  // x: [T, in_shard.size()] -> y: [T, out], summed over the group (one all-reduce) when
  // `reduce`, else this rank's partial sums (the caller maps them, e.g. a reduce-scatter under
  // sequence parallelism).
  void forward(const float* x, int64_t T, float* y, bool reduce = true) const;
  // Backward of forward(x) -> y, with dy: [T, out] (the same on every rank): dw [out,
  // in_shard.size()] += dy^T . x (skipped when null); dx [T, in_shard.size()] = dy . W (skipped
  // when null). reduce_from_region's backward is the identity: no communication.
  void backward(const float* x, const float* dy, int64_t T, float* dx, float* dw) const;
  // The two halves of backward() (no communication in either).
  void backward_input(const float* dy, int64_t T, float* dx) const;
  void backward_weight(const float* x, const float* dy, int64_t T, float* dw) const;
  const Tensor& weight() const { return weight_; }
  const ShardSpec& in_shard() const { return in_shard_; }
  const comm::Group& group() const { return group_; }

 private:
  Tensor weight_;
  ShardSpec in_shard_;
  comm::Group group_;
};

}  // namespace parallm::parallel
