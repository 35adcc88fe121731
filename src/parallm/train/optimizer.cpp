#include "parallm/train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/optim.h"

namespace parallm::train {
namespace {

// Below this many elements the pool's hand-off costs more than the loop (a norm weight, a bias).
constexpr int64_t kParallelMin = int64_t{1} << 15;

void check_finite(double v, const char* flag) {
  if (!std::isfinite(v)) fail("optimizer", flag, " ", v, " is not a finite number");
}

}  // namespace

void check_config(const AdamWConfig& c) {
  check_finite(c.lr, "--lr");
  check_finite(c.min_lr, "--min-lr");
  check_finite(c.beta1, "--beta1");
  check_finite(c.beta2, "--beta2");
  check_finite(c.eps, "--eps");
  check_finite(c.weight_decay, "--weight-decay");
  check_finite(c.grad_clip, "--grad-clip");
  if (c.lr < 0) fail("optimizer", "--lr ", c.lr, " is negative");
  if (c.min_lr < 0 || c.min_lr > c.lr)
    fail("optimizer", "--min-lr ", c.min_lr, " must be in [0, --lr ", c.lr, "]");
  if (c.warmup_steps < 0) fail("optimizer", "--warmup-steps ", c.warmup_steps, " is negative");
  if (c.steps < 1) fail("optimizer", "--steps ", c.steps, " must be at least 1");
  if (c.schedule != "constant" && c.schedule != "cosine")
    fail("optimizer", "--lr-schedule \"", c.schedule, "\" is neither constant nor cosine");
  // torch.optim.AdamW's own checks: betas in [0, 1), eps and weight decay non-negative.
  if (c.beta1 < 0 || c.beta1 >= 1) fail("optimizer", "--beta1 ", c.beta1, " must be in [0, 1)");
  if (c.beta2 < 0 || c.beta2 >= 1) fail("optimizer", "--beta2 ", c.beta2, " must be in [0, 1)");
  if (c.eps < 0) fail("optimizer", "--eps ", c.eps, " is negative");
  if (c.weight_decay < 0) fail("optimizer", "--weight-decay ", c.weight_decay, " is negative");
  if (c.grad_clip < 0) fail("optimizer", "--grad-clip ", c.grad_clip, " is negative (0: off)");
}

double learning_rate(const AdamWConfig& c, int64_t k) {
  if (k < c.warmup_steps) {
    return c.lr * static_cast<double>(k + 1) / static_cast<double>(c.warmup_steps);
  }
  if (c.schedule == "constant") return c.lr;
  const int64_t span = c.steps - c.warmup_steps;
  // Past the end (or a schedule with no room after the warm-up) the cosine has reached min_lr;
  // clamping keeps a run that continues beyond --steps from climbing back up the cosine.
  const double progress =
      span <= 0 ? 1.0
                : std::clamp(static_cast<double>(k - c.warmup_steps) / static_cast<double>(span),
                             0.0, 1.0);
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

double clip_factor(double max_norm, double norm) {
  if (max_norm <= 0) return 1.0;
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to at most 1. std::min keeps a NaN
  // coefficient NaN, as torch.clamp does (a NaN norm poisons the step there too).
  const double coef = max_norm / (norm + 1e-6);
  return std::min(coef, 1.0);
}

double sum_of_squares(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  auto body = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kNormChunk, end = std::min(n, begin + kNormChunk);
      double s = 0;
      for (int64_t i = begin; i < end; ++i) s += static_cast<double>(x[i]) * x[i];
      partial[static_cast<size_t>(c)] = s;
    }
  };
  if (chunks > 1) {
    ThreadPool::current().parallel_for(chunks, body);
  } else {
    body(0, chunks);
  }
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, bool decay,
                  const AdamWConfig& c, double lr, int64_t step, float grad_scale) {
  if (step < 1) fail("optimizer", "AdamW step ", step, " must be at least 1 (1-based)");
  if (n <= 0) return;
  // The scalars torch computes once per tensor, in double as Python does; torch then applies
  // each to the f32 tensors as an f32 scalar, and so does the kernel (kernels/optim.h: every
  // operation in f32, in torch's order, eight lanes at a time).
  const double b1 = c.beta1, b2 = c.beta2;
  kernels::AdamWScalars s;
  s.grad_scale = grad_scale;
  s.decay = static_cast<float>(decay ? 1.0 - lr * c.weight_decay : 1.0);
  s.beta1 = static_cast<float>(b1);
  s.one_minus_beta1 = static_cast<float>(1.0 - b1);
  s.beta2 = static_cast<float>(b2);
  s.one_minus_beta2 = static_cast<float>(1.0 - b2);
  s.bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(b2, static_cast<double>(step))));
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(b1, static_cast<double>(step))));
  s.eps = static_cast<float>(c.eps);
  auto body = [&](int64_t begin, int64_t end) {
    kernels::adamw(p + begin, g + begin, m + begin, v + begin, end - begin, s);
  };
  if (n >= kParallelMin) {
    ThreadPool::current().parallel_for(n, body);
  } else {
    body(0, n);
  }
}

}  // namespace parallm::train
