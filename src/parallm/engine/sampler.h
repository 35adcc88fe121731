// Sampler: picks the next token from logits split by vocabulary across a tensor-parallel group,
// without gathering the vocabulary.
//  - greedy (temperature 0): each rank finds its best (logit, id); one all-gather of those pairs.
//  - temperature only: the global max by a scalar all-reduce and every rank's share of the
//    normaliser by a scalar all-gather; every rank draws the same uniform number (same seed), the
//    rank whose share of the probability mass holds it picks the token inside its shard, and one
//    gather of ids tells the others. Exact.
//  - top-k / top-p: each rank keeps its local candidates (its top k, and its prefix reaching mass
//    p: together a superset of the global top-k / nucleus, so the result is exact); only those are
//    exchanged, then every rank samples the same token from them.
// Every rank of the group must call sample() with the same parameters; all return the same id.
// The sampler calls no collective itself: every exchange is one of parallel::VocabExchange's (the
// vocab-parallel LM head's), and ids cross the group as integers (I32, or a (logit, id) pair as one
// I64), exact for every id an int32 holds.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/parallel/lm_head.h"

namespace parallm {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  uint64_t seed = 0;
};

class Sampler {
 public:
  Sampler(SamplingParams params, comm::Group tp);
  // logits: this rank's [vocab_end - vocab_begin] slice of the vocabulary; ids are global
  // (vocab_begin + i), so vocab_end must fit an int32.
  int32_t sample(const float* logits, int64_t vocab_begin, int64_t vocab_end);
  const SamplingParams& params() const { return params_; }
  // Advances the generator past `draws` draws, as if that many tokens had been sampled (each
  // non-greedy sample draws exactly one number; greedy draws none): a request restarted after
  // preemption continues its random stream where it stopped.
  void skip(uint64_t draws) { rng_.discard(draws); }

 private:
  int32_t greedy(const float* logits, int64_t begin, int64_t n);
  int32_t full(const float* logits, int64_t begin, int64_t n);
  int32_t truncated(const float* logits, int64_t begin, int64_t n);
  double uniform();  // [0, 1), identical on every rank

  SamplingParams params_;
  parallel::VocabExchange vocab_;  // over the TP group
  std::mt19937_64 rng_;
};

// Validates parameters; throws std::invalid_argument naming the flag and value.
void validate_sampling(const SamplingParams& p);

}  // namespace parallm
