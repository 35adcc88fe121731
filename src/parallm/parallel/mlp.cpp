#include "parallm/parallel/mlp.h"

#include "parallm/core/error.h"
#include "parallm/kernels/ops.h"
#include "parallm/kernels/backward.h"

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

void ParallelMlp::forward_train(const float* xn, int64_t T, MlpCache& cache, float* out) const {
  const int64_t fl = ffn_.size();
  cache.gu.resize(static_cast<size_t>(T * 2 * fl));
  cache.h.resize(static_cast<size_t>(T * fl));
  if (T == 0) return;
  gate_up_.forward(xn, T, cache.gu.data());
  for (int64_t t = 0; t < T; ++t) {
    const float* row = cache.gu.data() + t * 2 * fl;
    kernels::silu_mul(row, row + fl, cache.h.data() + t * fl, fl);
  }
  down_.forward(cache.h.data(), T, out);
}

void ParallelMlp::backward(const float* xn, MlpCache& cache, const float* dout, int64_t T,
                           float* dxn, float* dgate_up, float* ddown) const {
  if (T == 0) return;
  const int64_t fl = ffn_.size();
  cache.dh.resize(static_cast<size_t>(T * fl));
  cache.dgu.resize(static_cast<size_t>(T * 2 * fl));
  down_.backward(cache.h.data(), dout, T, cache.dh.data(), ddown);  // [T, hidden] -> [T, fl]
  for (int64_t t = 0; t < T; ++t) {
    const float* row = cache.gu.data() + t * 2 * fl;
    float* drow = cache.dgu.data() + t * 2 * fl;
    kernels::swiglu_backward(row, row + fl, cache.dh.data() + t * fl, fl, drow, drow + fl);
  }
  gate_up_.backward(xn, cache.dgu.data(), T, dxn, dgate_up);  // all-reduces dxn
}

}  // namespace parallm::parallel
