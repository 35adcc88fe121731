#include "parallm/engine/logprobs.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace parallm {

using parallel::outranks;
using parallel::VocabCandidate;

LogprobResult token_logprobs(const parallel::VocabExchange& vocab, const float* logits,
                             int64_t vocab_begin, int64_t vocab_end, int32_t token, int k) {
  const int64_t n = vocab_end - vocab_begin;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, logits[i]);
  m = vocab.max(m);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(logits[i]) - m);
  const double log_z = static_cast<double>(m) + std::log(static_cast<double>(vocab.sum(
                                                    static_cast<float>(s))));
  const bool mine = token >= vocab_begin && token < vocab_end;
  const float logit = vocab.max(mine ? logits[token - vocab_begin] : kNegInf);
  LogprobResult out;
  out.logprob = static_cast<float>(logit - log_z);
  if (k > 0) {
    std::vector<VocabCandidate> local(n);
    for (int64_t i = 0; i < n; ++i)
      local[i] = {logits[i], static_cast<int32_t>(vocab_begin + i)};
    const size_t keep = std::min<size_t>(static_cast<size_t>(k), local.size());
    std::partial_sort(local.begin(), local.begin() + keep, local.end(), outranks);
    local.resize(keep);
    std::vector<VocabCandidate> all = vocab.all_candidates(local);
    std::sort(all.begin(), all.end(), outranks);
    if (all.size() > static_cast<size_t>(k)) all.resize(k);
    for (VocabCandidate& c : all) c.logit = static_cast<float>(c.logit - log_z);
    out.top = std::move(all);
  }
  return out;
}

}  // namespace parallm
