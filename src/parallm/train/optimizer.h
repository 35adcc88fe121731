// AdamW with torch.optim.AdamW's semantics, the learning-rate schedule, and global gradient-norm
// clipping with torch.nn.utils.clip_grad_norm_'s. All state is f32.
#pragma once

#include <cstdint>
#include <string>

namespace parallm::train {

struct AdamWConfig {
  double lr = 3e-4;
  double min_lr = 0.0;
  int64_t warmup_steps = 0;
  std::string schedule = "cosine";  // "constant" or "cosine"
  int64_t steps = 1;                // total steps (the cosine's length)
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // max global norm; 0: no clipping
};

// Throws std::invalid_argument naming the flag (--lr, --min-lr, --warmup-steps, --lr-schedule,
// --steps, --beta1, --beta2, --eps, --weight-decay, --grad-clip) and its value when it is out of
// range.
void check_config(const AdamWConfig& c);

// The learning rate of step k (0-based): warm-up lr*(k+1)/warmup for k < warmup, then constant,
// or min_lr + 0.5*(lr - min_lr)*(1 + cos(pi*(k - warmup)/(steps - warmup))). The cosine's
// progress is clamped to [0, 1], so steps at or past `steps` (and steps <= warmup) get min_lr.
double learning_rate(const AdamWConfig& c, int64_t k);

// clip_grad_norm_: the factor every gradient is multiplied by for a global norm `norm`:
// max_norm / (norm + 1e-6) when that is below 1, else 1 (and 1 when max_norm is 0).
double clip_factor(double max_norm, double norm);

// Sum of x[i]^2 in double, for the global gradient norm (sqrt of the sum over all parameters).
// Summed in fixed chunks of kNormChunk elements, each in double, then the chunk sums in order, so
// the result does not depend on the number of threads.
constexpr int64_t kNormChunk = 1 << 16;
double sum_of_squares(const float* x, int64_t n);

// One AdamW step on n elements, as torch.optim.AdamW computes it: g *= grad_scale (the clip
// factor); p *= 1 - lr*wd (when decay); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), t = step (1-based); the scalars in
// double, the element-wise work in f32 (kernels/optim.h). Threads over the rank's pool.
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, bool decay,
                  const AdamWConfig& c, double lr, int64_t step, float grad_scale);

}  // namespace parallm::train
