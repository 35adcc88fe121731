#include "parallm/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "parallm/core/error.h"

namespace parallm {
namespace {

// A (logit, id) pair travelling as two f32 slots; the id's bits are copied, not converted.
struct Candidate {
  float logit;
  int32_t id;
};
static_assert(sizeof(Candidate) == 8);

bool better(const Candidate& a, const Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

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
    : params_(params), tp_(std::move(tp)), rng_(params.seed) {
  validate_sampling(params_);
}

double Sampler::uniform() {
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;
}

int32_t Sampler::sample(const float* logits, int64_t vocab_begin, int64_t vocab_end) {
  const int64_t n = vocab_end - vocab_begin;
  if (params_.temperature == 0.0f || params_.top_k == 1) return greedy(logits, vocab_begin, n);
  if (params_.top_k == 0 && params_.top_p >= 1.0f) return full(logits, vocab_begin, n);
  return truncated(logits, vocab_begin, n);
}

int32_t Sampler::greedy(const float* logits, int64_t begin, int64_t n) {
  Candidate best{-std::numeric_limits<float>::infinity(), static_cast<int32_t>(begin)};
  for (int64_t i = 0; i < n; ++i) {
    const float v = clean(logits[i]);
    if (v > best.logit) best = {v, static_cast<int32_t>(begin + i)};
  }
  if (tp_.size() == 1) return best.id;
  std::vector<Candidate> all(tp_.size());
  tp_.all_gather(&best, all.data(), 2, DType::F32);
  return std::min_element(all.begin(), all.end(), better)->id;
}

int32_t Sampler::full(const float* logits, int64_t begin, int64_t n) {
  const float inv_t = 1.0f / params_.temperature;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, clean(logits[i]) * inv_t);
  tp_.all_reduce(&m, 1, comm::ReduceOp::Max);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(clean(logits[i]) * inv_t - m));
  float local = static_cast<float>(s);
  std::vector<float> sums(tp_.size());
  tp_.all_gather(&local, sums.data(), 1, DType::F32);
  const double total = std::accumulate(sums.begin(), sums.end(), 0.0);
  double u = uniform() * total;
  // The rank whose slice of the mass holds u picks the token; every rank finds the same owner.
  int owner = tp_.size() - 1;
  for (int r = 0; r < tp_.size(); ++r) {
    if (u < sums[r] || r == tp_.size() - 1) {
      owner = r;
      break;
    }
    u -= sums[r];
  }
  float chosen = -1.0f;
  if (owner == tp_.rank()) {
    chosen = static_cast<float>(begin + n - 1);
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      acc += std::exp(static_cast<double>(clean(logits[i]) * inv_t - m));
      if (u < acc) {
        chosen = static_cast<float>(begin + i);
        break;
      }
    }
  }
  tp_.all_reduce(&chosen, 1, comm::ReduceOp::Max);
  return static_cast<int32_t>(chosen);
}

int32_t Sampler::truncated(const float* logits, int64_t begin, int64_t n) {
  const float inv_t = 1.0f / params_.temperature;
  std::vector<Candidate> local(n);
  for (int64_t i = 0; i < n; ++i)
    local[i] = {clean(logits[i]) * inv_t, static_cast<int32_t>(begin + i)};
  std::sort(local.begin(), local.end(), better);
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
    float m = local.empty() ? -std::numeric_limits<float>::infinity() : local[0].logit;
    tp_.all_reduce(&m, 1, comm::ReduceOp::Max);
    double s = 0;
    for (const Candidate& c : local) s += std::exp(static_cast<double>(c.logit - m));
    float z = static_cast<float>(s);
    tp_.all_reduce(&z, 1, comm::ReduceOp::Sum);
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
  std::vector<Candidate> merged = local;
  if (tp_.size() > 1) {
    float count = static_cast<float>(local.size());
    float max_count = count;
    tp_.all_reduce(&max_count, 1, comm::ReduceOp::Max);
    const size_t width = static_cast<size_t>(max_count);
    std::vector<Candidate> padded(width, Candidate{-std::numeric_limits<float>::infinity(), -1});
    std::copy(local.begin(), local.end(), padded.begin());
    std::vector<Candidate> all(width * tp_.size());
    tp_.all_gather(padded.data(), all.data(), 2 * width, DType::F32);
    merged.clear();
    for (const Candidate& c : all)
      if (c.id >= 0) merged.push_back(c);
    std::sort(merged.begin(), merged.end(), better);
  }
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
