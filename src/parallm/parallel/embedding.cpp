#include "parallm/parallel/embedding.h"

#include <cstring>

#include "parallm/core/error.h"
#include "parallm/parallel/mappings.h"
#include "parallm/kernels/backward.h"

namespace parallm::parallel {

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
  // Rows of ids outside this rank's range are zero here: the sum over ranks completes them.
  reduce_from_region_forward(group_, x, T, hidden);
}

void VocabParallelEmbedding::backward(const int32_t* ids, int64_t T, const float* dx,
                                      float* dtable) const {
  kernels::embedding_backward(ids, T, dx, table_.dim(1), vocab_shard_.begin, vocab_shard_.end,
                            dtable);
}

}  // namespace parallm::parallel
