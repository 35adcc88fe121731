// Linear layers: y = x W^T with W stored as [out_features, in_features] (PyTorch's layout) in f32,
// bf16 or f16. One token (T == 1, decoding) goes to a SIMD GEMV that streams the weight once; many
// tokens (prefill) go to OpenBLAS sgemm, with 16-bit weights widened to f32 a block of rows at a
// time so the conversion is paid once per block, not once per token.
#pragma once

#include <cstdint>

#include "parallm/core/tensor.h"

namespace parallm::kernels {

// x: [T, K] f32 (row stride K); w: [N, K] contiguous, f32/bf16/f16; y: [T, N] f32.
// Block-quantized weights (Q8_0, Q4_0, Q4_K, Q6_K) go to kernels/quant_matmul.h (matmul_ref: the
// f32 product on the dequantized weights).
// accumulate: y += x W^T instead of y = x W^T. Threads: ThreadPool::current().
// No alignment needed. T < 64 runs the GEMV (W streamed once per call); T >= 64 runs OpenBLAS
// sgemm with OpenBLAS set to 1 thread (once per process) and each pool thread widening 16-bit
// weights into its own thread-local scratch (up to 8 MiB, kept for the thread's lifetime).
// Safe to call concurrently from threads with different pools; x and y must not overlap.
void matmul(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate = false);

// Plain loops, for tests: same contract, one thread, no SIMD.
void matmul_ref(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate = false);

}  // namespace parallm::kernels
