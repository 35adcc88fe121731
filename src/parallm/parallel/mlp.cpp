#include "parallm/parallel/mlp.h"

#include "parallm/core/error.h"
#include "parallm/kernels/ops.h"

namespace parallm::parallel {

FusedShardSpec ParallelMlp::gate_up_spec(const ShardSpec& ffn) {
  return {{{"gate_proj", ffn, 1}, {"up_proj", ffn, 1}}};
}

ParallelMlp::ParallelMlp(Tensor gate_up, Tensor down, ShardSpec ffn, comm::Group group)
    : ffn_(ffn), group_(std::move(group)) {
  if (ffn_.size() <= 0)
    fail("mlp", "empty FFN shard [", ffn_.begin, ", ", ffn_.end, ") of ", ffn_.full);
  gate_up_ = ColumnParallelLinear(std::move(gate_up), gate_up_spec(ffn_), group_);
  down_ = RowParallelLinear(std::move(down), ffn_, group_);
  if (down_.weight().dim(0) != gate_up_.weight().dim(1))
    fail("mlp", "down_proj shard ", down_.weight().describe(), " does not map back to hidden ",
         gate_up_.weight().dim(1));
}

void ParallelMlp::forward(const float* xn, int64_t T, float* scratch, float* out) const {
  if (T == 0) return;
  const int64_t fl = ffn_.size();
  float* gu = scratch;  // [T, 2 fl]: each row gate | up
  gate_up_.forward(xn, T, gu);
  for (int64_t t = 0; t < T; ++t) {
    float* row = gu + t * 2 * fl;
    kernels::silu_mul(row, row + fl, gu + t * fl, fl);  // packs [T, fl] at the front of gu
  }
  down_.forward(gu, T, out);
}

}  // namespace parallm::parallel
