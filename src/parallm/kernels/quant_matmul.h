// y = x W^T on block-quantized weights (core/quant.h), llama.cpp's way: each token's activations
// are quantized per 32 values to Q8_0, then each (weight block, activation block) pair is an
// integer dot product scaled by the two f16 scales, summed in f32.
//
// Q8_0 and Q4_0 weights run integer kernels for T < 64 tokens (decoding, small batches): the
// plain reference, AVX2 (sign trick + maddubs/madd), AVX-VNNI and AVX-512 VNNI (vpdpbusd), chosen
// at run time from kernels/cpu.h's level (PARALLM_SIMD caps it) and the CPU's VNNI flags. From 64
// tokens (prefill) every block dtype is dequantized to f32 a block of rows at a time and
// multiplied by OpenBLAS sgemm with f32 activations (`path` is then unused). Q4_K and Q6_K below
// 64 tokens are dequantized a row at a time and multiplied in f32 (correct, not fast: no K-format
// integer kernel yet).
// kernels::matmul sends every block-dtype weight here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallm/core/quant.h"
#include "parallm/core/tensor.h"

namespace parallm::kernels {

enum class QuantPath { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3 };

std::string quant_path_name(QuantPath p);  // "scalar", "avx2", "avx-vnni", "avx512-vnni"
// The paths this CPU can run (Scalar always), and the one quant_matmul uses by default: the best
// of them within simd_level() (Avx512Vnni needs Avx512, the others Avx2).
std::vector<QuantPath> quant_paths_available();
QuantPath quant_path();

// x [T, K] f32 -> T * K / 32 Q8_0 blocks (row t at out + t * K / 32). K % 32 == 0.
void quantize_activations(const float* x, int64_t T, int64_t K, quant::BlockQ8_0* out);

// x [T, K] f32; w [N, K] contiguous block dtype; y [T, N] f32 (+= when accumulate). Threads:
// ThreadPool::current(), split over rows of W. `path` must be one of quant_paths_available().
// T and every dimension below 2^31.
void quant_matmul(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                  QuantPath path);
inline void quant_matmul(const float* x, int64_t T, const Tensor& w, float* y,
                         bool accumulate = false) {
  quant_matmul(x, T, w, y, accumulate, quant_path());
}

}  // namespace parallm::kernels
