#include "parallm/parallel/cross_entropy.h"

#include <cmath>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/backward.h"

namespace parallm::parallel {
namespace {

constexpr const char* kWho = "parallel.cross_entropy";

// Rows over the rank's pool once there is enough work to pay for waking the threads.
template <class Fn>
void for_rows(int64_t rows, int64_t row_size, Fn&& fn) {
  constexpr int64_t kParallelMin = int64_t{1} << 15;
  if (rows > 1 && rows * row_size >= kParallelMin && ThreadPool::current().size() > 1) {
    ThreadPool::current().parallel_for(rows, fn);
  } else if (rows > 0) {
    fn(int64_t{0}, rows);
  }
}

}  // namespace

double cross_entropy(const parallel::VocabExchange& ex, const float* logits, int64_t R,
                     int64_t V_local, int64_t vocab_begin, const int32_t* targets, float grad_scale,
                     float* dlogits) {
  if (R < 0 || V_local < 0 || vocab_begin < 0)
    fail(kWho, "cross_entropy: need R, V_local, vocab_begin >= 0, got ", R, ", ", V_local, ", ",
         vocab_begin);
  // R is the same on every rank of the group (the same rows, split by vocabulary), so all of them
  // skip the collectives together.
  if (R == 0) return 0.0;
    std::vector<float> mx(static_cast<size_t>(R));
  for_rows(R, V_local, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      mx[r] = kernels::row_max(logits + r * V_local, V_local);
    }
  });
  ex.max(mx.data(), R);
  // One sum all-reduce of [3R]: the sums of exp, the target's logit (from its owner, zero
  // elsewhere) and how many ranks own the target (1 when it is a valid id).
  std::vector<float> red(static_cast<size_t>(3 * R), 0.0f);
  for_rows(R, V_local, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = logits + r * V_local;
      const float m = mx[r];
      // dlogits keeps exp(x - max) for the gradient.
      const double sum = kernels::exp_sum(row, V_local, m, dlogits ? dlogits + r * V_local : nullptr);
      red[r] = static_cast<float>(sum);
      const int64_t local = static_cast<int64_t>(targets[r]) - vocab_begin;
      if (local >= 0 && local < V_local) {
        red[R + r] = row[local];
        red[2 * R + r] = 1.0f;
      }
    }
  });
  ex.sum(red.data(), 3 * R);
  double loss = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (red[2 * R + r] != 1.0f)
      fail(kWho, "cross_entropy: target ", targets[r], " of row ", r,
           " is outside the vocabulary (", red[2 * R + r], " ranks own it)");
    loss += std::log(static_cast<double>(red[r])) + mx[r] - red[R + r];
  }
  if (dlogits) {
    for_rows(R, V_local, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* d = dlogits + r * V_local;
        const float f = static_cast<float>(grad_scale / static_cast<double>(red[r]));
        for (int64_t j = 0; j < V_local; ++j) d[j] *= f;
        const int64_t local = static_cast<int64_t>(targets[r]) - vocab_begin;
        if (local >= 0 && local < V_local) d[local] -= grad_scale;
      }
    });
  }
  return loss;
}

}  // namespace parallm::parallel
