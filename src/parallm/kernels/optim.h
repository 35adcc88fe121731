// The optimizer's element-wise update, AdamW as torch.optim.AdamW (1.13, single-tensor path)
// computes it: every operation in f32, in torch's order.
#pragma once

#include <cstdint>

namespace parallm::kernels {

// The per-tensor scalars, computed once per step by the caller (train/optimizer.cpp) in double
// as Python does, then rounded to f32 as torch does when it applies them to f32 tensors.
struct AdamWScalars {
  float grad_scale = 1;    // the clip factor (1 without clipping)
  float decay = 1;         // 1 - lr * weight_decay (1 for tensors without weight decay)
  float beta1 = 0.9f, one_minus_beta1 = 0.1f;
  float beta2 = 0.999f, one_minus_beta2 = 0.001f;
  float bias2_sqrt = 1;    // sqrt(1 - beta2^step)
  float step_size = 0;     // lr / (1 - beta1^step)
  float eps = 1e-8f;
};

// For i in [0, n):
//   g' = g * grad_scale;  p' = p * decay
//   m = m * beta1 + (1 - beta1) * g'
//   v = v * beta2 + (1 - beta2) * g' * g'
//   p = p' - step_size * m / (sqrt(v) / bias2_sqrt + eps)
// The SIMD path and the plain one give the same bits: both fuse the same multiply-adds (fma) and
// sqrt and division are exactly rounded.
void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s);
void adamw_ref(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s);

}  // namespace parallm::kernels
