#include "parallm/parallel/linear.h"

#include "parallm/core/error.h"
#include "parallm/kernels/matmul.h"
#include "parallm/parallel/mappings.h"

namespace parallm::parallel {

ColumnParallelLinear::ColumnParallelLinear(Tensor weight, FusedShardSpec out_shard,
                                           comm::Group group)
    : weight_(std::move(weight)), out_shard_(std::move(out_shard)), group_(std::move(group)) {
  if (weight_.ndim() != 2 || weight_.dim(0) != out_shard_.size())
    fail("parallel", "column-parallel weight ", weight_.describe(), " does not hold ",
         out_shard_.size(), " output rows");
}

void ColumnParallelLinear::forward(const float* x, int64_t T, float* y) const {
  // The input is already the same on every rank: copy_to_region's forward is the identity (its
  // backward, the all-reduce of the input gradient, is where this layer will communicate).
  kernels::matmul(x, T, weight_, y);
}

RowParallelLinear::RowParallelLinear(Tensor weight, ShardSpec in_shard, comm::Group group)
    : weight_(std::move(weight)), in_shard_(in_shard), group_(std::move(group)) {
  if (weight_.ndim() != 2 || weight_.dim(1) != in_shard_.size())
    fail("parallel", "row-parallel weight ", weight_.describe(), " does not hold ",
         in_shard_.size(), " input columns");
}

void RowParallelLinear::forward(const float* x, int64_t T, float* y) const {
  kernels::matmul(x, T, weight_, y);
  // Partial sums -> full output. (A bias, if LLaMA had one, would be added after this.)
  reduce_from_region_forward(group_, y, T, weight_.dim(0));
}

}  // namespace parallm::parallel
