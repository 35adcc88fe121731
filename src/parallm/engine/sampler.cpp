#include "parallm/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "parallm/core/error.h"

namespace parallm {
namespace {

using parallel::outranks;
using parallel::VocabCandidate;

float clean(float v) {
  return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
}

}  // namespace

void validate_sampling(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    fail("sampler", "--temperature must be >= 0, got ", p.temperature);
  if (p.top_k < 0) fail("sampler", "--top-k must be >= 0, got ", p.top_k);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    fail("sampler", "--top-p must be in (0, 1], got ", p.top_p);
}

Sampler::Sampler(SamplingParams params, comm::Group tp)
    : params_(params), vocab_(std::move(tp)), rng_(params.seed) {
  validate_sampling(params_);
}

double Sampler::uniform() {
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;
}

int32_t Sampler::sample(const float* logits, int64_t vocab_begin, int64_t vocab_end) {
  if (vocab_begin < 0 || vocab_end < vocab_begin ||
      vocab_end > static_cast<int64_t>(std::numeric_limits<int32_t>::max()) + 1)
    fail("sampler", "vocab slice [", vocab_begin, ", ", vocab_end,
         ") is not a range of int32 token ids");
  const int64_t n = vocab_end - vocab_begin;
  if (params_.temperature == 0.0f || params_.top_k == 1) return greedy(logits, vocab_begin, n);
  if (params_.top_k == 0 && params_.top_p >= 1.0f) return full(logits, vocab_begin, n);
  return truncated(logits, vocab_begin, n);
}

int32_t Sampler::greedy(const float* logits, int64_t begin, int64_t n) {
  VocabCandidate best{-std::numeric_limits<float>::infinity(), static_cast<int32_t>(begin)};
  for (int64_t i = 0; i < n; ++i) {
    const float v = clean(logits[i]);
    if (v > best.logit) best = {v, static_cast<int32_t>(begin + i)};
  }
  return vocab_.argmax(best).id;
}

int32_t Sampler::full(const float* logits, int64_t begin, int64_t n) {
  const float inv_t = 1.0f / params_.temperature;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, clean(logits[i]) * inv_t);
  m = vocab_.max(m);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(clean(logits[i]) * inv_t - m));
  const std::vector<float> sums = vocab_.gather(static_cast<float>(s));
  const int p = static_cast<int>(sums.size());
  const double total = std::accumulate(sums.begin(), sums.end(), 0.0);
  double u = uniform() * total;
  // The rank whose slice of the mass holds u picks the token; every rank finds the same owner.
  int owner = p - 1;
  for (int r = 0; r < p; ++r) {
    if (u < sums[r] || r == p - 1) {
      owner = r;
      break;
    }
    u -= sums[r];
  }
  int32_t chosen = -1;
  if (owner == vocab_.group().rank()) {
    chosen = static_cast<int32_t>(begin + n - 1);
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      acc += std::exp(static_cast<double>(clean(logits[i]) * inv_t - m));
      if (u < acc) {
        chosen = static_cast<int32_t>(begin + i);
        break;
      }
    }
  }
  return vocab_.share_id(chosen, owner);
}

int32_t Sampler::truncated(const float* logits, int64_t begin, int64_t n) {
  const float inv_t = 1.0f / params_.temperature;
  std::vector<VocabCandidate> local(n);
  for (int64_t i = 0; i < n; ++i)
    local[i] = {clean(logits[i]) * inv_t, static_cast<int32_t>(begin + i)};
  std::sort(local.begin(), local.end(), outranks);
  // Without top-k, top-p measures mass against the whole vocabulary: keep the global max and
  // normaliser. With top-k it is measured within the top k (Hugging Face's order of warpers).
  float global_m = 0.0f, global_z = 0.0f;
  if (params_.top_k > 0) {
    // The global top k are among the union of the ranks' local top k.
    if (static_cast<int64_t>(local.size()) > params_.top_k) local.resize(params_.top_k);
  } else {
    // Nucleus without top-k: a token in the global nucleus has less than p of the mass above it,
    // so it is inside its own rank's prefix that first reaches p (measured against the global
    // normaliser).
    const float m =
        vocab_.max(local.empty() ? -std::numeric_limits<float>::infinity() : local[0].logit);
    double s = 0;
    for (const VocabCandidate& c : local) s += std::exp(static_cast<double>(c.logit - m));
    const float z = vocab_.sum(static_cast<float>(s));
    double cum = 0;
    size_t keep = 0;
    while (keep < local.size() && cum < params_.top_p) {
      cum += std::exp(static_cast<double>(local[keep].logit - m)) / z;
      ++keep;
    }
    local.resize(std::max<size_t>(keep, 1));
    global_m = m;
    global_z = z;
  }
  std::vector<VocabCandidate> merged = vocab_.all_candidates(local);
  if (vocab_.group().size() > 1) std::sort(merged.begin(), merged.end(), outranks);
  if (params_.top_k > 0 && static_cast<int64_t>(merged.size()) > params_.top_k)
    merged.resize(params_.top_k);
  // Unnormalised probabilities of the candidates, and the mass top-p is measured against.
  const double m = params_.top_k > 0 ? merged[0].logit : global_m;
  std::vector<double> p(merged.size());
  double z = 0;
  for (size_t i = 0; i < merged.size(); ++i) z += p[i] = std::exp(merged[i].logit - m);
  if (params_.top_k == 0) z = global_z;
  size_t keep = merged.size();
  if (params_.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < merged.size(); ++i) {
      cum += p[i] / z;
      if (cum >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += p[i];
  double u = uniform() * total;
  for (size_t i = 0; i < keep; ++i) {
    if (u < p[i]) return merged[i].id;
    u -= p[i];
  }
  return merged[keep - 1].id;
}

}  // namespace parallm
