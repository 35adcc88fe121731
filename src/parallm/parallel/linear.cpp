#include "parallm/parallel/linear.h"

#include <algorithm>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/kernels/matmul.h"
#include "parallm/parallel/mappings.h"
#include "parallm/kernels/backward.h"

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

namespace {

const float* f32_weight(const Tensor& w, const char* layer) {
  if (w.dtype() != DType::F32 || !w.is_contiguous())
    fail("parallel", layer, " backward needs a contiguous f32 weight, got ", w.describe());
  return w.data<float>();
}

}  // namespace

void ColumnParallelLinear::backward_weight(const float* x, const float* dy, int64_t T,
                                           float* dw) const {
  const int64_t out = weight_.dim(0), in = weight_.dim(1);
  bool replicated = false;
  for (const FusedPart& p : out_shard_.parts) replicated |= p.replicas > 1;
  if (!replicated || group_.size() == 1) {
    kernels::linear_backward_weight(dy, x, T, out, in, dw);
    return;
  }
  // This micro-batch's gradient alone (dw may hold earlier micro-batches' sums, already
  // identical on the replicas), then each replicated part summed over the group through a
  // buffer of the full tensor's rows where every rank writes its own rows.
  std::vector<float> g(static_cast<size_t>(out * in), 0.0f);
  kernels::linear_backward_weight(dy, x, T, out, in, g.data());
  for (size_t i = 0; i < out_shard_.parts.size(); ++i) {
    const FusedPart& p = out_shard_.parts[i];
    float* mine = g.data() + out_shard_.offset(i) * in;
    if (p.replicas <= 1) continue;
    std::vector<float> full(static_cast<size_t>(p.rows.full * in), 0.0f);
    std::copy(mine, mine + p.rows.size() * in, full.begin() + p.rows.begin * in);
    group_.all_reduce(full.data(), full.size());
    std::copy(full.begin() + p.rows.begin * in, full.begin() + p.rows.end * in, mine);
  }
  for (int64_t i = 0; i < out * in; ++i) dw[i] += g[i];
}

void ColumnParallelLinear::backward_input(const float* dy, int64_t T, float* dx,
                                          bool reduce) const {
  const int64_t out = weight_.dim(0), in = weight_.dim(1);
  kernels::linear_backward_input(dy, f32_weight(weight_, "column-parallel"), T, out, in, dx);
  // copy_to_region's backward: the input was replicated, each rank holds a partial gradient.
  if (reduce) copy_to_region_backward(group_, dx, T, in);
}

void ColumnParallelLinear::backward(const float* x, const float* dy, int64_t T, float* dx,
                                    float* dw) const {
  f32_weight(weight_, "column-parallel");
  if (dw != nullptr) backward_weight(x, dy, T, dw);
  if (dx != nullptr) backward_input(dy, T, dx);
}

void RowParallelLinear::backward_weight(const float* x, const float* dy, int64_t T,
                                        float* dw) const {
  const int64_t out = weight_.dim(0), in = weight_.dim(1);
  kernels::linear_backward_weight(dy, x, T, out, in, dw);
}

void RowParallelLinear::backward_input(const float* dy, int64_t T, float* dx) const {
  // reduce_from_region's backward is the identity: dy is already the full gradient on each rank.
  const int64_t out = weight_.dim(0), in = weight_.dim(1);
  kernels::linear_backward_input(dy, f32_weight(weight_, "row-parallel"), T, out, in, dx);
}

void RowParallelLinear::backward(const float* x, const float* dy, int64_t T, float* dx,
                                 float* dw) const {
  f32_weight(weight_, "row-parallel");
  if (dw != nullptr) backward_weight(x, dy, T, dw);
  if (dx != nullptr) backward_input(dy, T, dx);
}

RowParallelLinear::RowParallelLinear(Tensor weight, ShardSpec in_shard, comm::Group group)
    : weight_(std::move(weight)), in_shard_(in_shard), group_(std::move(group)) {
  if (weight_.ndim() != 2 || weight_.dim(1) != in_shard_.size())
    fail("parallel", "row-parallel weight ", weight_.describe(), " does not hold ",
         in_shard_.size(), " input columns");
}

void RowParallelLinear::forward(const float* x, int64_t T, float* y, bool reduce) const {
  kernels::matmul(x, T, weight_, y);
  // Partial sums -> full output. (A bias, if LLaMA had one, would be added after this.)
  if (reduce) reduce_from_region_forward(group_, y, T, weight_.dim(0));
}

}  // namespace parallm::parallel
