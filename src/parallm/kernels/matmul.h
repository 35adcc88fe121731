// Linear layers: y = x W^T with W stored as [out_features, in_features] (PyTorch's layout) in f32,
// bf16 or f16. One token (T == 1, decoding) goes to a SIMD GEMV that streams the weight once; many
// tokens (prefill) go to OpenBLAS sgemm, with 16-bit weights widened to f32 a block of rows at a
// time so the conversion is paid once per block, not once per token, or, for bf16 weights on a
// CPU with AVX512_BF16, to our own bf16 GEMM (vdpbf16ps).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "parallm/core/tensor.h"

namespace parallm::kernels {

// The f32/bf16/f16 GEMV (T < kGemvMaxTokens) takes the tokens kGemvTokenChunk at a time, a tile's
// rows of W from memory for the first chunk and from L1/L2 for each further one: a step of T
// tokens streams W once and passes over it ceil(T / 4) times (plan/estimate.cpp prices the further
// passes, `plan --reread-bw`).
inline constexpr int64_t kGemvMaxTokens = 64;
inline constexpr int64_t kGemvTokenChunk = 4;

// x: [T, K] f32 (row stride K); w: [N, K] contiguous, f32/bf16/f16; y: [T, N] f32.
// Block-quantized weights (Q8_0, Q4_0, Q4_K, Q6_K) go to kernels/quant_matmul.h (matmul_ref: the
// f32 product on the dequantized weights).
// accumulate: y += x W^T instead of y = x W^T. Threads: ThreadPool::current().
// No alignment needed. T < 64 runs the GEMV (W streamed once per call); T >= 64 runs OpenBLAS
// sgemm with OpenBLAS set to 1 thread (once per process) and each pool thread widening 16-bit
// weights into its own thread-local scratch (up to 8 MiB, kept for the thread's lifetime).
// bf16 weights with T >= 64 on a CPU with AVX512_BF16 (at the avx512 SIMD level) and K even run
// an AVX512_BF16 GEMM instead (matmul_kernel says which): x rounded to bf16, products and sums in
// f32, so results move by about bf16's rounding of x (2^-9 relative per element).
// Safe to call concurrently from threads with different pools; x and y must not overlap.
void matmul(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate = false);

// What matmul runs for a weight of `type`, T tokens and K columns at the current SIMD level:
// "gemv", "sgemm" or "bf16-gemm-avx512" (block dtypes: quant_matmul_kernel). For tests and
// benchmarks.
std::string matmul_kernel(DType type, int64_t T, int64_t K);
// For kernels/quant_matmul.cpp's K formats: whether the AVX512_BF16 GEMM runs here (an
// AVX512_BF16 CPU at the avx512 SIMD level), and that GEMM on weights given as f32 rows:
// rows(n0, nr, out) writes rows n0..n0+nr-1 of W [N, K] to out [nr, K] (called on the pool's
// threads, up to 32 rows at a time); they are rounded to bf16 as x is. K even.
bool bf16_gemm_available();
void bf16_gemm_f32_rows(const float* x, int64_t T, int64_t K, int64_t N, float* y,
                        bool accumulate, const std::function<void(int64_t, int, float*)>& rows);
// Plain loops, for tests: same contract, one thread, no SIMD.
void matmul_ref(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate = false);

}  // namespace parallm::kernels
