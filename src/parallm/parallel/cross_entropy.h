// Megatron's vocab-parallel cross-entropy, over the vocabulary split of the LM head
// (parallel/lm_head.h): the logits are never gathered.
#pragma once

#include <cstdint>

#include "parallm/parallel/lm_head.h"

namespace parallm::parallel {

// logits [R, V_local], this rank's columns [vocab_begin, vocab_begin + V_local) of the full
// vocabulary; targets [R] (full-vocabulary ids). The row max and the sum of exp are all-reduced
// over `ex`'s group (the TP group), the target's logit is summed from the rank that owns it. The
// sums travel together: two all-reduces in all, a max of [R] floats, then a sum of [3R] (sums of
// exp, target logits, and how many ranks own each target: an id outside the vocabulary throws
// std::invalid_argument on every rank alike). On the size-1 group: plain cross-entropy with no
// collective. Every rank of the group passes the same R (the same rows, split by vocabulary).
// Returns the sum over rows of -log softmax(logits)[target] (the same on every rank) and, when
// dlogits is not null, writes dlogits [R, V_local] = grad_scale * (softmax - onehot(target)), which
// needs no communication. The reference is kernels::cross_entropy_ref.
double cross_entropy(const VocabExchange& ex, const float* logits, int64_t R, int64_t V_local,
                     int64_t vocab_begin, const int32_t* targets, float grad_scale,
                     float* dlogits);

}  // namespace parallm::parallel
