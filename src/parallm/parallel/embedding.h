// VocabParallelEmbedding: each rank owns a vocab range of the table, looks up the ids it owns,
// writes zeros for the others, and one all-reduce completes the rows (reduce_from_region, see
// parallel/mappings.h; its backward is the identity: each rank will scatter the gradient rows of
// its own ids).
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/parallel/shard.h"

namespace parallm::parallel {

class VocabParallelEmbedding {
 public:
  VocabParallelEmbedding() = default;
  // table: [vocab_shard.size(), hidden], this rank's vocab rows.
  VocabParallelEmbedding(Tensor table, ShardSpec vocab_shard, comm::Group group);
  // ids: [T] -> x: [T, hidden] f32 (one all-reduce when the group has more than one rank).
  // Throws std::invalid_argument naming the id when an id is outside [0, vocab).
  // sequence_parallel (training, Korthikanti et al.): x is this rank's rows only,
  // [shard_of(T, group).size(), hidden], by a reduce-scatter instead of the all-reduce. scratch:
  // the full partial rows [T, hidden] and the mapping's staging (null: allocated per call).
  void forward(const int32_t* ids, int64_t T, float* x, bool sequence_parallel = false,
               std::vector<float>* scratch = nullptr) const;
  // Backward: dtable [vocab_shard.size(), hidden] += the rows of dx [T, hidden] (the same on every
  // rank) whose ids this rank owns. reduce_from_region's backward is the identity: no
  // communication. sequence_parallel: dx is this rank's rows, all-gathered first (the
  // reduce-scatter's backward); scratch as for forward.
  void backward(const int32_t* ids, int64_t T, const float* dx, float* dtable,
                bool sequence_parallel = false, std::vector<float>* scratch = nullptr) const;
  const Tensor& table() const { return table_; }
  const ShardSpec& vocab_shard() const { return vocab_shard_; }
  const comm::Group& group() const { return group_; }

 private:
  Tensor table_;
  ShardSpec vocab_shard_;
  comm::Group group_;
};

}  // namespace parallm::parallel
