// Element-wise and row-wise kernels of the LLaMA forward pass, each with a plain reference
// version (suffix _ref) that the tests compare against.
#pragma once

#include <cstdint>

namespace parallm::kernels {

// y[t] = x[t] / rms(x[t]) * w, for T rows of D. x and y may alias.
void rmsnorm(const float* x, const float* w, float* y, int64_t T, int64_t D, float eps);
void rmsnorm_ref(const float* x, const float* w, float* y, int64_t T, int64_t D, float eps);

// In-place softmax over n values.
void softmax(float* x, int64_t n);
void softmax_ref(float* x, int64_t n);

// out[i] = silu(gate[i]) * up[i] (SwiGLU); out may be exactly gate or up (not a shifted overlap).
void silu_mul(const float* gate, const float* up, float* out, int64_t n);
void silu_mul_ref(const float* gate, const float* up, float* out, int64_t n);

// RoPE conventions. Interleaved: pairs (x[2i], x[2i+1]) rotate together (Meta, llama2.c).
// HalfSplit: pairs (x[i], x[i + d/2]) (Hugging Face's rotate_half).
enum class RopeStyle { Interleaved, HalfSplit };

// x: [T, heads, head_dim], rotated in place; token t is at position positions[t]; pair i turns by
// positions[t] * inv_freq[i], i < head_dim / 2.
void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
          const float* inv_freq, RopeStyle style);
void rope_ref(float* x, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
              const float* inv_freq, RopeStyle style);
// The inverse rotation (each pair turned back by the same angle): RoPE's backward.
void rope_inverse(float* x, int64_t T, int64_t heads, int64_t head_dim, const int32_t* positions,
                  const float* inv_freq, RopeStyle style);

}  // namespace parallm::kernels
