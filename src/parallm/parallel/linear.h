// The tensor-parallel linear layers, named as in MLX and Megatron.
//
// ColumnParallelLinear ("all-to-sharded"): W [out, in] split by output features; every rank gets
// the same input and produces its slice of the output. No communication forward.
// RowParallelLinear ("sharded-to-all"): W split by input features; each rank multiplies its slice
// of the input and one all-reduce sums the partial outputs.
// VocabParallelEmbedding: each rank owns a vocab range of the table, looks up the ids it owns,
// writes zeros for the others, and one all-reduce completes the rows.
//
// Each takes its weight already sliced (the loader reads only the rank's bytes). Backward passes
// (for training) pair with these: column's backward all-reduces the input gradient, row's is
// communication-free, as in Megatron's copy/reduce mappings.
#pragma once

#include <cstdint>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/parallel/shard.h"

namespace parallm::parallel {

class ColumnParallelLinear {
 public:
  ColumnParallelLinear() = default;
  // weight: [out_shard.size(), in], this rank's rows.
  ColumnParallelLinear(Tensor weight, ShardSpec out_shard);
  // x: [T, in] -> y: [T, out/tp] (this rank's columns of the output).
  void forward(const float* x, int64_t T, float* y) const;
  const Tensor& weight() const { return weight_; }
  const ShardSpec& out_shard() const { return out_shard_; }

 private:
  Tensor weight_;
  ShardSpec out_shard_;
};

class RowParallelLinear {
 public:
  RowParallelLinear() = default;
  // weight: [out, in_shard.size()], this rank's columns.
  RowParallelLinear(Tensor weight, ShardSpec in_shard, comm::Group group);
  // x: [T, in/tp] -> y: [T, out], summed over the group (one all-reduce).
  void forward(const float* x, int64_t T, float* y) const;
  const Tensor& weight() const { return weight_; }

 private:
  Tensor weight_;
  ShardSpec in_shard_;
  comm::Group group_;
};

class VocabParallelEmbedding {
 public:
  VocabParallelEmbedding() = default;
  // table: [vocab_shard.size(), hidden], this rank's vocab rows.
  VocabParallelEmbedding(Tensor table, ShardSpec vocab_shard, comm::Group group);
  // ids: [T] -> x: [T, hidden] f32 (one all-reduce when the group has more than one rank).
  // Throws std::invalid_argument naming the id when an id is outside [0, vocab).
  void forward(const int32_t* ids, int64_t T, float* x) const;
  const Tensor& table() const { return table_; }
  const ShardSpec& vocab_shard() const { return vocab_shard_; }

 private:
  Tensor table_;
  ShardSpec vocab_shard_;
  comm::Group group_;
};

}  // namespace parallm::parallel
