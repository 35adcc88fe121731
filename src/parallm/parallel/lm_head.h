// The vocab-parallel LM head and the exchanges over a vocabulary split across a TP group.
//
// VocabParallelLmHead: W [vocab, hidden] split by vocabulary rows (rank r owns ShardSpec::even(
// vocab, tp, r)); forward gives this rank's logits with no communication. Nothing downstream needs
// the full row: the sampler works on the split through VocabExchange (a few scalars and candidate
// lists cross the group, never the vocabulary), and so will the vocab-parallel cross-entropy
// (Megatron's: global max and sum of exp over the split by two all-reduces of [rows] vectors, and
// the target's logit from the rank that owns it by one more; its backward, softmax minus one-hot
// on each rank's slice, needs no communication). gather_logits is for tests and --print-logits.
//
// Integer data: token and candidate ids travel as DType::I32 / I64, exact over the whole int32
// range (the old sampler's float round trip was exact only below 2^24). A (logit, id) candidate is
// 8 bytes and travels as one I64 element: its bytes are copied, never converted.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/parallel/shard.h"

namespace parallm::parallel {

// One token of the vocabulary with its logit (or scaled logit).
struct VocabCandidate {
  float logit;
  int32_t id;
};
static_assert(sizeof(VocabCandidate) == 8, "a candidate travels as one I64");

// The order every rank agrees on: higher logit first, the lower id on ties.
inline bool outranks(const VocabCandidate& a, const VocabCandidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// The collectives over a vocabulary split across `group` (the TP group). Every rank of the group
// calls each exchange in the same order; all get the same answer. On the size-1 group each is a
// local computation, with no collective.
class VocabExchange {
 public:
  VocabExchange() = default;  // the size-1 group
  explicit VocabExchange(comm::Group group) : group_(std::move(group)) {}
  const comm::Group& group() const { return group_; }

  // The best of the ranks' candidates by outranks() (one all-gather of one I64 per rank).
  VocabCandidate argmax(VocabCandidate local) const;
  // values: [n], in place, the max / the sum over the group (f32 all-reduce).
  void max(float* values, int64_t n) const;
  void sum(float* values, int64_t n) const;
  float max(float value) const;
  float sum(float value) const;
  // Every rank's value in rank order, [size()] (an all-gather: bitwise the same on every rank, so
  // decisions taken on it, e.g. which rank's share of the mass holds a draw, agree).
  std::vector<float> gather(float value) const;
  // Rank `owner`'s id, on every rank (ids as I32).
  int32_t share_id(int32_t id, int owner) const;
  // The union of every rank's candidates, in rank order (each rank's list in its own order).
  // Lists may differ in length: the counts travel first (I32), the lists padded to the longest.
  std::vector<VocabCandidate> all_candidates(const std::vector<VocabCandidate>& local) const;
  // local: this rank's slice [shard.size()] of one row -> the full row [shard.full] on every
  // rank. `shard` is this rank's part of the near-even split (ShardSpec::even) of the vocabulary.
  std::vector<float> gather_row(const float* local, const ShardSpec& shard) const;

 private:
  comm::Group group_;
};

class VocabParallelLmHead {
 public:
  VocabParallelLmHead() = default;
  // weight: [vocab_shard.size(), hidden], this rank's vocab rows, any dtype kernels::matmul
  // takes (may share the embedding's storage when the embeddings are tied). vocab_shard must be
  // ShardSpec::even(vocab, group.size(), group.rank()).
  VocabParallelLmHead(Tensor weight, ShardSpec vocab_shard, comm::Group group);

  // x: [R, hidden] (after the final norm) -> logits: [R, vocab_shard().size()], this rank's
  // slice. No communication. sequence_parallel (training): x is this rank's rows,
  // [shard_of(R, group).size(), hidden], all-gathered before the GEMM (logits still cover all R
  // rows); scratch: the gathered rows and the mapping's staging (null: allocated per call).
  void forward(const float* x, int64_t R, float* logits, bool sequence_parallel = false,
               std::vector<float>* scratch = nullptr) const;
  // Backward (training, f32 weight): dlogits [R, vocab_shard().size()] -> dw [vocab_shard().size(),
  // hidden] += dlogits^T . x (skipped when null); dx [R, hidden] = dlogits . W summed over the
  // group (the head's input is replicated: copy_to_region's backward; skipped when null).
  // sequence_parallel: x and dx are this rank's rows; x is gathered again for dw, and dx is
  // reduce-scattered instead of all-reduced.
  void backward(const float* x, const float* dlogits, int64_t R, float* dx, float* dw,
                bool sequence_parallel = false, std::vector<float>* scratch = nullptr) const;
  // The two halves of backward() for the zero-bubble split (backward() is backward_weight() then
  // backward_input(), bit for bit): the input gradient (collective: all-reduce, or reduce-scatter
  // under SP) and dw += dlogits^T . x (collective under SP only: x is gathered again).
  void backward_input(const float* dlogits, int64_t R, float* dx, bool sequence_parallel = false,
                      std::vector<float>* scratch = nullptr) const;
  void backward_weight(const float* x, const float* dlogits, int64_t R, float* dw,
                       bool sequence_parallel = false, std::vector<float>* scratch = nullptr) const;

  // local: [vocab_shard().size()] (one row of forward's output) -> the full row [vocab].
  std::vector<float> gather_logits(const float* local) const;
  // local: [R, vocab_local] -> full: [R, vocab] (all-gather along the vocabulary).
  void gather_logits(const float* local, int64_t R, float* full) const;

  // The exchanges the sampler (and later the cross-entropy) runs over this head's split.
  const VocabExchange& exchange() const { return exchange_; }

  const Tensor& weight() const { return weight_; }
  const ShardSpec& vocab_shard() const { return vocab_shard_; }
  const comm::Group& group() const { return exchange_.group(); }
  int64_t vocab() const { return vocab_shard_.full; }
  int64_t hidden() const { return weight_.defined() ? weight_.dim(1) : 0; }

 private:
  const float* f32_weight() const;  // throws unless the weight is contiguous f32

  Tensor weight_;
  ShardSpec vocab_shard_;
  VocabExchange exchange_;
};

}  // namespace parallm::parallel
