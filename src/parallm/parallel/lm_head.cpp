#include "parallm/parallel/lm_head.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"
#include "parallm/kernels/matmul.h"
#include "parallm/parallel/mappings.h"
#include "parallm/kernels/backward.h"

namespace parallm::parallel {
namespace {

void gather_integers(const comm::Group& group, const void* send, void* recv, size_t count,
                     DType dtype) {
  TraceSpan span("all_gather", "comm");
  group.all_gather(send, recv, count, dtype);
}

}  // namespace

VocabCandidate VocabExchange::argmax(VocabCandidate local) const {
  if (group_.size() == 1) return local;
  std::vector<VocabCandidate> all(group_.size());
  gather_integers(group_, &local, all.data(), 1, DType::I64);
  return *std::min_element(all.begin(), all.end(), outranks);
}

void VocabExchange::max(float* values, int64_t n) const {
  if (group_.size() == 1 || n == 0) return;
  TraceSpan span("all_reduce", "comm");
  group_.all_reduce(values, static_cast<size_t>(n), comm::ReduceOp::Max);
}

void VocabExchange::sum(float* values, int64_t n) const {
  if (group_.size() == 1 || n == 0) return;
  TraceSpan span("all_reduce", "comm");
  group_.all_reduce(values, static_cast<size_t>(n), comm::ReduceOp::Sum);
}

float VocabExchange::max(float value) const {
  max(&value, 1);
  return value;
}

float VocabExchange::sum(float value) const {
  sum(&value, 1);
  return value;
}

std::vector<float> VocabExchange::gather(float value) const {
  std::vector<float> all(group_.size(), value);
  if (group_.size() == 1) return all;
  TraceSpan span("all_gather", "comm");
  group_.all_gather(&value, all.data(), 1, DType::F32);
  return all;
}

int32_t VocabExchange::share_id(int32_t id, int owner) const {
  if (owner < 0 || owner >= group_.size())
    fail("parallel", "share_id: owner rank ", owner, " is outside the group of ", group_.size());
  if (group_.size() == 1) return id;
  TraceSpan span("broadcast", "comm");
  group_.broadcast(&id, 1, DType::I32, owner);
  return id;
}

std::vector<VocabCandidate> VocabExchange::all_candidates(
    const std::vector<VocabCandidate>& local) const {
  const int p = group_.size();
  if (p == 1) return local;
  if (local.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    fail("parallel", "all_candidates: ", local.size(), " candidates on rank ", group_.rank(),
         " exceed the int32 count");
  const int32_t count = static_cast<int32_t>(local.size());
  std::vector<int32_t> counts(p);
  gather_integers(group_, &count, counts.data(), 1, DType::I32);
  const size_t width = static_cast<size_t>(*std::max_element(counts.begin(), counts.end()));
  std::vector<VocabCandidate> out;
  if (width == 0) return out;
  std::vector<VocabCandidate> padded(width, VocabCandidate{0.0f, -1});
  std::copy(local.begin(), local.end(), padded.begin());
  std::vector<VocabCandidate> all(width * p);
  gather_integers(group_, padded.data(), all.data(), width, DType::I64);
  for (int r = 0; r < p; ++r)
    out.insert(out.end(), all.begin() + r * width, all.begin() + r * width + counts[r]);
  return out;
}

std::vector<float> VocabExchange::gather_row(const float* local, const ShardSpec& shard) const {
  const int p = group_.size();
  const ShardSpec expect = ShardSpec::even(shard.full, p, group_.rank());
  if (shard.begin != expect.begin || shard.end != expect.end)
    fail("parallel", "gather_row: rank ", group_.rank(), " of ", p, " holds vocab [", shard.begin,
         ", ", shard.end, ") of ", shard.full, " but the near-even split gives it [", expect.begin,
         ", ", expect.end, ")");
  std::vector<float> out(static_cast<size_t>(shard.full));
  gather_from_region_forward(group_, local, 1, shard.full, out.data());
  return out;
}

VocabParallelLmHead::VocabParallelLmHead(Tensor weight, ShardSpec vocab_shard, comm::Group group)
    : weight_(std::move(weight)), vocab_shard_(vocab_shard), exchange_(std::move(group)) {
  if (weight_.ndim() != 2 || weight_.dim(0) != vocab_shard_.size())
    fail("parallel", "LM head shard ", weight_.describe(), " does not hold ", vocab_shard_.size(),
         " vocab rows");
  const comm::Group& g = exchange_.group();
  const ShardSpec expect = ShardSpec::even(vocab_shard_.full, g.size(), g.rank());
  if (vocab_shard_.begin != expect.begin || vocab_shard_.end != expect.end)
    fail("parallel", "LM head on rank ", g.rank(), " of ", g.size(), " holds vocab [",
         vocab_shard_.begin, ", ", vocab_shard_.end, ") of ", vocab_shard_.full,
         " but the near-even split gives it [", expect.begin, ", ", expect.end, ")");
}

namespace {

// The scratch of a sequence-parallel call: [R, hidden] rows, then the mapping's staging.
float* sp_rows(std::vector<float>* given, std::vector<float>& own, int64_t R, int64_t hidden,
               const comm::Group& g, float** seq) {
  std::vector<float>& buf = given != nullptr ? *given : own;
  const int64_t extra = sequence_scratch(R, hidden, g.size());
  buf.resize(static_cast<size_t>(R * hidden + extra));
  *seq = extra > 0 ? buf.data() + R * hidden : nullptr;
  return buf.data();
}

}  // namespace

void VocabParallelLmHead::forward(const float* x, int64_t R, float* logits,
                                  bool sequence_parallel, std::vector<float>* scratch) const {
  // x: [R, hidden] -> logits: [R, vocab/tp]
  const comm::Group& g = exchange_.group();
  if (sequence_parallel && g.size() > 1) {
    std::vector<float> own;
    float* seq = nullptr;
    float* full = sp_rows(scratch, own, R, hidden(), g, &seq);
    gather_from_sequence_forward(g, x, R, hidden(), full, seq);
    kernels::matmul(full, R, weight_, logits);
    return;
  }
  kernels::matmul(x, R, weight_, logits);
}

std::vector<float> VocabParallelLmHead::gather_logits(const float* local) const {
  return exchange_.gather_row(local, vocab_shard_);
}

void VocabParallelLmHead::gather_logits(const float* local, int64_t R, float* full) const {
  gather_from_region_forward(exchange_.group(), local, R, vocab_shard_.full, full);
}

const float* VocabParallelLmHead::f32_weight() const {
  if (weight_.dtype() != DType::F32 || !weight_.is_contiguous())
    fail("parallel", "LM head backward needs a contiguous f32 weight, got ", weight_.describe());
  return weight_.data<float>();
}

void VocabParallelLmHead::backward_weight(const float* x, const float* dlogits, int64_t R,
                                          float* dw, bool sequence_parallel,
                                          std::vector<float>* scratch) const {
  const int64_t vl = weight_.dim(0), h = weight_.dim(1);
  const comm::Group& g = exchange_.group();
  if (sequence_parallel && g.size() > 1) {  // the input on all rows again (not kept)
    std::vector<float> own;
    float* seq = nullptr;
    float* full = sp_rows(scratch, own, R, h, g, &seq);
    gather_from_sequence_forward(g, x, R, h, full, seq);
    kernels::linear_backward_weight(dlogits, full, R, vl, h, dw);
    return;
  }
  kernels::linear_backward_weight(dlogits, x, R, vl, h, dw);
}

void VocabParallelLmHead::backward_input(const float* dlogits, int64_t R, float* dx,
                                         bool sequence_parallel,
                                         std::vector<float>* scratch) const {
  const int64_t vl = weight_.dim(0), h = weight_.dim(1);
  const float* w = f32_weight();
  const comm::Group& g = exchange_.group();
  if (sequence_parallel && g.size() > 1) {  // partial sums on all rows, reduce-scattered
    std::vector<float> own;
    float* seq = nullptr;
    float* full = sp_rows(scratch, own, R, h, g, &seq);
    kernels::linear_backward_input(dlogits, w, R, vl, h, full);
    gather_from_sequence_backward(g, full, R, h, dx, seq);
    return;
  }
  kernels::linear_backward_input(dlogits, w, R, vl, h, dx);
  copy_to_region_backward(g, dx, R, h);  // the head's input was replicated
}

void VocabParallelLmHead::backward(const float* x, const float* dlogits, int64_t R, float* dx,
                                   float* dw, bool sequence_parallel,
                                   std::vector<float>* scratch) const {
  f32_weight();
  if (dw != nullptr) backward_weight(x, dlogits, R, dw, sequence_parallel, scratch);
  if (dx != nullptr) backward_input(dlogits, R, dx, sequence_parallel, scratch);
}

}  // namespace parallm::parallel
