#include "parallm/parallel/mlp.h"

#include <cstring>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/kernels/ops.h"
#include "parallm/kernels/backward.h"
#include "parallm/parallel/mappings.h"

namespace parallm::parallel {

FusedShardSpec ParallelMlp::gate_up_spec(const ShardSpec& ffn) {
  return {{{"gate_proj", ffn, 1}, {"up_proj", ffn, 1}}};
}

ParallelMlp::ParallelMlp(RowBlocks gate_up, Tensor down, ShardSpec ffn, comm::Group group)
    : ffn_(ffn), group_(std::move(group)) {
  if (ffn_.size() <= 0)
    fail("mlp", "empty FFN shard [", ffn_.begin, ", ", ffn_.end, ") of ", ffn_.full);
  gate_up_ = ColumnParallelLinear(std::move(gate_up), gate_up_spec(ffn_), group_);
  down_ = RowParallelLinear(std::move(down), ffn_, group_);
  if (down_.weight().dim(0) != gate_up_.in_features())
    fail("mlp", "down_proj shard ", down_.weight().describe(), " does not map back to hidden ",
         gate_up_.in_features());
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

namespace {

void resize(std::vector<float>& v, int64_t n) { v.resize(static_cast<size_t>(n)); }

}  // namespace

void ParallelMlp::forward_train(const float* xn, int64_t T, MlpCache& cache, float* out,
                                const TrainMode& mode) const {
  const int64_t fl = ffn_.size(), H = gate_up_.in_features();
  const bool sp = mode.sequence_parallel && group_.size() > 1;
  resize(cache.gu, T * 2 * fl);
  resize(cache.h, T * fl);
  if (T == 0) return;
  const float* x = xn;
  float* seq = nullptr;
  if (sp) {  // gather_from_sequence: all T rows for the gate/up GEMM; not kept
    resize(cache.xg, T * H);
    seq = sequence_scratch(cache.seq, T, H, group_);
    gather_from_sequence_forward(group_, xn, T, H, cache.xg.data(), seq);
    x = cache.xg.data();
  }
  gate_up_.forward(x, T, cache.gu.data());
  for (int64_t t = 0; t < T; ++t) {
    const float* row = cache.gu.data() + t * 2 * fl;
    kernels::silu_mul(row, row + fl, cache.h.data() + t * fl, fl);
  }
  if (sp) {
    down_.forward(cache.h.data(), T, cache.xg.data(), /*reduce=*/false);
    reduce_scatter_to_sequence_forward(group_, cache.xg.data(), T, H, out, seq);
  } else {
    down_.forward(cache.h.data(), T, out);
  }
}

void ParallelMlp::backward(const float* xn, MlpCache& cache, const float* dout, int64_t T,
                           float* dxn, float* dgate_up, float* ddown,
                           const TrainMode& mode) const {
  if (T == 0) return;
  const int64_t fl = ffn_.size(), H = gate_up_.in_features();
  const bool sp = mode.sequence_parallel && group_.size() > 1;
  const bool defer = mode.defer_weight_grads;
  if (static_cast<int64_t>(cache.gu.size()) != T * 2 * fl ||
      static_cast<int64_t>(cache.h.size()) != T * fl)
    fail("mlp", "backward of ", T, " tokens without its forward_train (the cache holds ",
         cache.h.size() / fl, " tokens)");
  resize(cache.dh, T * fl);
  float* seq = sp ? sequence_scratch(cache.seq, T, H, group_) : nullptr;
  // The output's gradient on all T rows, kept for backward_weight() when deferring.
  const float* g_out = output_grad_on_all_rows(group_, dout, T, H, sp, defer,
                                               defer ? cache.wgrad_dout : cache.dout, seq);
  if (!defer && ddown != nullptr) down_.backward_weight(cache.h.data(), g_out, T, ddown);
  down_.backward_input(g_out, T, cache.dh.data());  // [T, hidden] -> [T, fl]
  std::vector<float>& dgu = defer ? cache.wgrad_dgu : cache.dgu;
  resize(dgu, T * 2 * fl);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = cache.gu.data() + t * 2 * fl;
    float* drow = dgu.data() + t * 2 * fl;
    kernels::swiglu_backward(row, row + fl, cache.dh.data() + t * fl, fl, drow, drow + fl);
  }
  if (!defer && dgate_up != nullptr) {
    const float* x = xn;
    if (sp) {  // the input again on all rows (the forward did not keep it)
      resize(cache.xg, T * H);
      gather_from_sequence_forward(group_, xn, T, H, cache.xg.data(), seq);
      x = cache.xg.data();
    }
    gate_up_.backward_weight(x, dgu.data(), T, dgate_up);
  }
  if (dxn != nullptr) {
    if (sp) {
      resize(cache.xg, T * H);
      gate_up_.backward_input(dgu.data(), T, cache.xg.data(), /*reduce=*/false);
      gather_from_sequence_backward(group_, cache.xg.data(), T, H, dxn, seq);
    } else {
      gate_up_.backward_input(dgu.data(), T, dxn);  // all-reduced
    }
  }
}

void ParallelMlp::backward_weight(const float* xn, MlpCache& cache, int64_t T, float* dgate_up,
                                  float* ddown, const TrainMode& mode) const {
  if (T == 0) return;
  const int64_t fl = ffn_.size(), H = gate_up_.in_features();
  if (static_cast<int64_t>(cache.wgrad_dgu.size()) != T * 2 * fl ||
      static_cast<int64_t>(cache.wgrad_dout.size()) != T * H ||
      static_cast<int64_t>(cache.h.size()) != T * fl)
    fail("mlp", "backward_weight of ", T, " tokens needs a backward() with defer_weight_grads "
         "first (the cache holds ", cache.wgrad_dgu.size(), " dgate_up floats, expected ",
         T * 2 * fl, ")");
  const bool sp = mode.sequence_parallel && group_.size() > 1;
  if (ddown != nullptr) down_.backward_weight(cache.h.data(), cache.wgrad_dout.data(), T, ddown);
  if (dgate_up != nullptr) {
    const float* x = xn;
    if (sp) {
      resize(cache.xg, T * H);
      gather_from_sequence_forward(group_, xn, T, H, cache.xg.data(),
                                   sequence_scratch(cache.seq, T, H, group_));
      x = cache.xg.data();
    }
    gate_up_.backward_weight(x, cache.wgrad_dgu.data(), T, dgate_up);
  }
  cache.wgrad_dgu.clear();
  cache.wgrad_dout.clear();
}

}  // namespace parallm::parallel
