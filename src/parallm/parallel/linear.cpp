#include "parallm/parallel/linear.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/kernels/backward.h"
#include "parallm/kernels/matmul.h"
#include "parallm/kernels/quant_matmul.h"
#include "parallm/parallel/mappings.h"

namespace parallm::parallel {

Tensor concat_rows(const std::vector<Tensor>& parts) {
  int64_t rows = 0;
  for (const Tensor& p : parts) {
    if (p.ndim() != 2 || p.dtype() != parts.at(0).dtype() || p.dim(1) != parts[0].dim(1) ||
        !p.is_contiguous())
      fail("parallel", "cannot stack ", p.describe(), " under ", parts[0].describe(),
           " (row blocks of one dtype and width)");
    // Its bytes are groups of 4 rows (kernels::repack_quant_weight): copied, they would be read
    // as plain rows. Stack first, then repack.
    if (kernels::is_repacked(p))
      fail("parallel", "cannot stack the repacked weight ", p.describe(),
           " (stack the plain rows, then repack)");
    rows += p.dim(0);
  }
  Tensor out = Tensor::empty(parts.at(0).dtype(), {rows, parts[0].dim(1)});
  char* dst = static_cast<char*>(out.raw());
  for (const Tensor& p : parts) {
    std::memcpy(dst, p.raw(), p.nbytes());
    dst += p.nbytes();
  }
  return out;
}

ColumnParallelLinear::ColumnParallelLinear(RowBlocks weight, FusedShardSpec out_shard,
                                           comm::Group group)
    : out_shard_(std::move(out_shard)), group_(std::move(group)) {
  std::vector<Tensor>& b = weight.blocks;
  if (b.empty()) fail("parallel", "column-parallel weight with no row blocks");
  int64_t rows = 0;
  bool one_dtype = true;
  for (const Tensor& t : b) {
    if (t.ndim() != 2 || t.dim(1) != b[0].dim(1))
      fail("parallel", "column-parallel row block ", t.describe(), " does not match ",
           b[0].describe());
    rows += t.dim(0);
    one_dtype &= t.dtype() == b[0].dtype();
  }
  if (rows != out_shard_.size()) {
    if (b.size() == 1)
      fail("parallel", "column-parallel weight ", b[0].describe(), " does not hold ",
           out_shard_.size(), " output rows");
    std::string all;
    for (const Tensor& t : b) all += cat(all.empty() ? "" : ", ", t.describe());
    fail("parallel", "column-parallel row blocks ", all, " (", rows, " rows) do not hold ",
         out_shard_.size(), " output rows");
  }
  in_ = b[0].dim(1);
  if (b.size() == 1)
    weight_ = std::move(b[0]);
  else if (one_dtype)
    weight_ = concat_rows(b);
  else
    blocks_ = std::move(b);
}

size_t ColumnParallelLinear::weight_bytes() const {
  size_t n = weight_.defined() ? weight_.nbytes() : 0;
  for (const Tensor& t : blocks_) n += t.nbytes();
  return n;
}

void ColumnParallelLinear::forward(const float* x, int64_t T, float* y) const {
  // The input is already the same on every rank: copy_to_region's forward is the identity (its
  // backward, the all-reduce of the input gradient, is where this layer will communicate).
  if (blocks_.empty()) return kernels::matmul(x, T, weight_, y);
  // Row blocks of different dtypes: each block's GEMM, then its columns of y.
  const int64_t N = out_features();
  thread_local std::vector<float> part;
  int64_t col = 0;
  for (const Tensor& b : blocks_) {
    const int64_t n = b.dim(0);
    part.resize(static_cast<size_t>(T * n));
    kernels::matmul(x, T, b, part.data());
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(y + t * N + col, part.data() + t * n, static_cast<size_t>(n) * sizeof(float));
    col += n;
  }
}

namespace {

const float* f32_weight(const Tensor& w, const char* layer) {
  if (!w.defined())
    fail("parallel", layer, " backward needs a contiguous f32 weight, got mixed-dtype row blocks");
  if (w.dtype() != DType::F32 || !w.is_contiguous())
    fail("parallel", layer, " backward needs a contiguous f32 weight, got ", w.describe());
  return w.data<float>();
}

}  // namespace

void ColumnParallelLinear::backward_weight(const float* x, const float* dy, int64_t T,
                                           float* dw) const {
  const int64_t out = out_features(), in = in_features();
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
  const int64_t out = out_features(), in = in_features();
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
