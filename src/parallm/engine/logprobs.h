// Log-probabilities of sampled tokens for serving (OpenAI's logprobs / top_logprobs): the
// log-softmax at temperature 1 over the whole vocabulary, whatever the request sampled with, from
// logits split by vocabulary over a TP group. Three scalar exchanges of the vocab-parallel LM
// head (the max, the normaliser, the token's logit) and, for top_logprobs, one candidate exchange
// (each rank's local best k: the global best k are among them). Every rank of the group calls it
// with the same token and k and gets the same values.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/parallel/lm_head.h"

namespace parallm {

struct LogprobResult {
  float logprob = 0;                             // of `token`
  std::vector<parallel::VocabCandidate> top;     // k best (id, logprob), most likely first
};

// logits: this rank's [vocab_end - vocab_begin] slice of one row.
LogprobResult token_logprobs(const parallel::VocabExchange& vocab, const float* logits,
                             int64_t vocab_begin, int64_t vocab_end, int32_t token, int k);

}  // namespace parallm
