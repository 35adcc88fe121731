#include "parallm/parallel/linear.h"

#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"
#include "parallm/kernels/matmul.h"

namespace parallm::parallel {

ColumnParallelLinear::ColumnParallelLinear(Tensor weight, ShardSpec out_shard)
    : weight_(std::move(weight)), out_shard_(out_shard) {
  if (weight_.ndim() != 2 || weight_.dim(0) != out_shard_.size())
    fail("parallel", "column-parallel weight ", weight_.describe(), " does not hold ",
         out_shard_.size(), " output rows");
}

void ColumnParallelLinear::forward(const float* x, int64_t T, float* y) const {
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
  TraceSpan span("all_reduce", "comm");
  group_.all_reduce(y, static_cast<size_t>(T * weight_.dim(0)));
}

VocabParallelEmbedding::VocabParallelEmbedding(Tensor table, ShardSpec vocab_shard,
                                               comm::Group group)
    : table_(std::move(table)), vocab_shard_(vocab_shard), group_(std::move(group)) {
  if (table_.ndim() != 2 || table_.dim(0) != vocab_shard_.size())
    fail("parallel", "embedding shard ", table_.describe(), " does not hold ", vocab_shard_.size(),
         " vocab rows");
}

void VocabParallelEmbedding::forward(const int32_t* ids, int64_t T, float* x) const {
  const int64_t hidden = table_.dim(1);
  const size_t row_bytes = static_cast<size_t>(hidden) * dtype_size(table_.dtype());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids[t];
    if (id < 0 || id >= vocab_shard_.full)
      fail("embedding", "token id ", id, " at position ", t, " is outside the vocabulary [0, ",
           vocab_shard_.full, ")");
    float* row = x + t * hidden;
    if (id >= vocab_shard_.begin && id < vocab_shard_.end) {
      const char* src =
          static_cast<const char*>(table_.raw()) + (id - vocab_shard_.begin) * row_bytes;
      convert(src, table_.dtype(), row, DType::F32, static_cast<size_t>(hidden));
    } else {
      std::memset(row, 0, static_cast<size_t>(hidden) * sizeof(float));
    }
  }
  if (group_.size() > 1) group_.all_reduce(x, static_cast<size_t>(T * hidden));
}

}  // namespace parallm::parallel
