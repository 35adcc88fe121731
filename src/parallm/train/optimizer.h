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

// The learning rate of step k (0-based): warm-up lr*(k+1)/warmup for k < warmup, then constant,
// or min_lr + 0.5*(lr - min_lr)*(1 + cos(pi*(k - warmup)/(steps - warmup))).
double learning_rate(const AdamWConfig& c, int64_t k);

// clip_grad_norm_: the factor every gradient is multiplied by for a global norm `norm`:
// max_norm / (norm + 1e-6) when that is below 1, else 1 (and 1 when max_norm is 0).
double clip_factor(double max_norm, double norm);

// One AdamW step on n elements (torch order): p *= 1 - lr*wd (when decay); m = b1 m + (1-b1) g;
// v = b2 v + (1-b2) g^2; p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), t = step
// (1-based). g is multiplied by grad_scale first (the clip factor). Threads over the rank's pool.
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, bool decay,
                  const AdamWConfig& c, double lr, int64_t step, float grad_scale);

}  // namespace parallm::train
