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

namespace {

// The scratch of a sequence-parallel call: [T, hidden] rows, then the mapping's staging.
float* sp_scratch(std::vector<float>* given, std::vector<float>& own, int64_t T, int64_t hidden,
                  const comm::Group& g, float** seq) {
  std::vector<float>& buf = given != nullptr ? *given : own;
  const int64_t extra = sequence_scratch(T, hidden, g.size());
  buf.resize(static_cast<size_t>(T * hidden + extra));
  *seq = extra > 0 ? buf.data() + T * hidden : nullptr;
  return buf.data();
}

}  // namespace

void VocabParallelEmbedding::forward(const int32_t* ids, int64_t T, float* x,
                                     bool sequence_parallel, std::vector<float>* scratch) const {
  const int64_t hidden = table_.dim(1);
  const bool sp = sequence_parallel && group_.size() > 1;
  std::vector<float> own;
  float* seq = nullptr;
  // Under SP the rows of all T tokens are partial sums here; only this rank's rows come out.
  float* rows = sp ? sp_scratch(scratch, own, T, hidden, group_, &seq) : x;
  // dtype_bytes: a block-quantized table (GGUF) is dequantized row by row here, at lookup.
  const size_t row_bytes = dtype_bytes(table_.dtype(), hidden);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids[t];
    if (id < 0 || id >= vocab_shard_.full)
      fail("embedding", "token id ", id, " at position ", t, " is outside the vocabulary [0, ",
           vocab_shard_.full, ")");
    float* row = rows + t * hidden;
    if (id >= vocab_shard_.begin && id < vocab_shard_.end) {
      const char* src =
          static_cast<const char*>(table_.raw()) + (id - vocab_shard_.begin) * row_bytes;
      convert(src, table_.dtype(), row, DType::F32, static_cast<size_t>(hidden));
    } else {
      std::memset(row, 0, static_cast<size_t>(hidden) * sizeof(float));
    }
  }
  // Rows of ids outside this rank's range are zero here: the sum over ranks completes them.
  if (sp) {
    reduce_scatter_to_sequence_forward(group_, rows, T, hidden, x, seq);
  } else {
    reduce_from_region_forward(group_, x, T, hidden);
  }
}

void VocabParallelEmbedding::backward(const int32_t* ids, int64_t T, const float* dx,
                                      float* dtable, bool sequence_parallel,
                                      std::vector<float>* scratch) const {
  const int64_t hidden = table_.dim(1);
  const float* rows = dx;
  std::vector<float> own;
  if (sequence_parallel && group_.size() > 1) {
    float* seq = nullptr;
    float* full = sp_scratch(scratch, own, T, hidden, group_, &seq);
    reduce_scatter_to_sequence_backward(group_, dx, T, hidden, full, seq);
    rows = full;
  }
  kernels::embedding_backward(ids, T, rows, hidden, vocab_shard_.begin, vocab_shard_.end, dtable);
}

}  // namespace parallm::parallel
