// The backward passes of the LLaMA building blocks, each beside a plain reference (*_ref: simple
// loops, written for clarity, used by the tests). No communication here: the tensor-parallel
// versions are the layers in parallel/, which call these on their shard and add the mappings (the
// vocab-parallel cross-entropy is parallel/cross_entropy.h, built on row_max and exp_sum below).
//
// Layout: row-major f32; T = tokens (B sequences of S tokens back to back), D = features.
// "accumulate" outputs (weight gradients) are added to; the others are overwritten. Outputs must
// not overlap inputs (except the in-place RoPE). The fast versions split work over
// ThreadPool::current() (OpenBLAS itself runs single-threaded), so call them from outside any
// parallel_for; for a given thread count their results are deterministic run to run.
#pragma once

#include <cstdint>

#include "parallm/kernels/ops.h"

namespace parallm::kernels {

// ---- linear: y [T, out] = x [T, in] . W^T, W [out, in] ----
// dx [T, in] = dy . W  (accumulate into dx when accumulate, else overwrite)
void linear_backward_input(const float* dy, const float* w, int64_t T, int64_t out, int64_t in,
                           float* dx, bool accumulate = false);
// dW [out, in] += dy^T . x
void linear_backward_weight(const float* dy, const float* x, int64_t T, int64_t out, int64_t in,
                            float* dw);
// y = x . W^T (f32 weights; through OpenBLAS)
void linear_forward(const float* x, const float* w, int64_t T, int64_t out, int64_t in, float* y);

// ---- embedding: x[t] = table[ids[t] - row_begin] for ids in [row_begin, row_end) ----
// dtable [row_end - row_begin, D] += dx[t] for each t whose id is in range.
void embedding_backward(const int32_t* ids, int64_t T, const float* dx, int64_t D,
                        int64_t row_begin, int64_t row_end, float* dtable);

// ---- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w ----
// Forward keeping rstd [T] (1/sqrt(mean(x^2)+eps)) for the backward.
void rmsnorm_forward(const float* x, const float* w, int64_t T, int64_t D, float eps, float* y,
                     float* rstd);
// dx [T, D] = d/dx (overwrite, or add when accumulate: the residual stream adds it),
// dw [D] += d/dw.
void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy,
                      int64_t T, int64_t D, float* dx, float* dw, bool accumulate);
void rmsnorm_backward_ref(const float* x, const float* w, float eps, const float* dy, int64_t T,
                          int64_t D, float* dx, float* dw, bool accumulate);

// ---- RoPE (both conventions, kernels::RopeStyle): the rotation's backward is the rotation by
// the opposite angle, in place on dx [T, heads * head_dim] at positions [T].
void rope_backward(float* dx, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
                   const float* inv_freq, kernels::RopeStyle style);
void rope_backward_ref(float* dx, int64_t T, int64_t heads, int64_t head_dim,
                       const int32_t* positions, const float* inv_freq, kernels::RopeStyle style);

// ---- causal grouped-query attention over B sequences of S tokens ----
// q [B*S, Hq*hd], k and v [B*S, Hkv*hd] (after RoPE); query head h reads KV head h / (Hq/Hkv).
// out [B*S, Hq*hd]; probs [B, Hq, S, S] (the softmax, zero above the diagonal) kept for the
// backward, or null: not kept (selective recomputation; only a block of rows per thread exists at
// a time). scale = 1/sqrt(hd).
void attention_forward(const float* q, const float* k, const float* v, int64_t B, int64_t S,
                       int64_t Hq, int64_t Hkv, int64_t hd, float* out, float* probs);
// dq, dk, dv (overwritten) from dout [B*S, Hq*hd]; dk and dv sum over the query heads of a group.
// probs: what attention_forward kept, or null: each block of softmax rows is recomputed from q and
// k by the forward's own code, so the gradients are bit for bit those of the kept probs.
void attention_backward(const float* q, const float* k, const float* v, const float* probs,
                        const float* dout, int64_t B, int64_t S, int64_t Hq, int64_t Hkv,
                        int64_t hd, float* dq, float* dk, float* dv);
void attention_backward_ref(const float* q, const float* k, const float* v, const float* dout,
                            int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t hd, float* dq,
                            float* dk, float* dv);

// ---- SwiGLU: h = silu(gate) * up ----
// dgate, dup [n] (overwritten) from dh [n].
void swiglu_backward(const float* gate, const float* up, const float* dh, int64_t n, float* dgate,
                     float* dup);

// ---- cross-entropy, row by row ----
// The max of x [n] (AVX2 where the CPU has it).
float row_max(const float* x, int64_t n);
// out[j] = exp(x[j] - m) (out may be x; null: not stored); returns the sum, taken in double.
double exp_sum(const float* x, int64_t n, float m, float* out);
// Plain cross-entropy over the whole vocabulary V: returns the sum over rows of
// -log softmax(logits)[target] and, when dlogits is not null, writes dlogits [R, V] =
// grad_scale * (softmax - onehot(target)). The reference for parallel::cross_entropy.
double cross_entropy_ref(const float* logits, int64_t R, int64_t V, const int32_t* targets,
                         float grad_scale, float* dlogits);

}  // namespace parallm::kernels
