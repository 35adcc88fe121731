// y = x W^T on block-quantized weights (core/quant.h), llama.cpp's way: each token's activations
// are quantized to 8 bits per block (Q8_0, 32 values, for Q8_0 and Q4_0 weights; BlockQ8_K, 256
// values with its sums of 16 codes, for Q4_K, Q5_K and Q6_K), then each (weight block, activation
// block) pair is an exact integer dot product scaled by the blocks' scales, summed in f32.
//
// Below 64 tokens (decoding, small batches) every block dtype runs an integer kernel, the plain
// reference or a SIMD path chosen at run time from kernels/cpu.h's level (PARALLM_SIMD caps it)
// and the CPU's VNNI flags: Q8_0 and Q4_0 have AVX2 (sign trick + maddubs/madd), AVX-VNNI and
// AVX-512 VNNI (vpdpbusd); Q4_K, Q5_K and Q6_K have AVX2 (maddubs/madd with the sub-block scales
// in the madd), and the AVX-VNNI and AVX-512 VNNI paths run that same AVX2 kernel for them. The
// K-format paths are bit-identical to their reference (same int32 sums, same f32 operations). From
// 64 tokens (prefill): Q8_0 and Q4_0 run an int8 GEMM (packed 32-row panels, activations
// quantized as for decoding; bit-identical to the plain reference): on the AVX-512 VNNI path with
// vpdpbusd, from 16 tokens there (batched decoding included), on the AVX2 and AVX-VNNI paths with
// vpmaddubsw (Q4_0 from 16 tokens), where the K formats have one too (sub-block scales applied in
// int32; Q4_K and Q6_K from 32 tokens, Q5_K from 48); the K formats on an AVX512_BF16 CPU (the
// AVX-512 VNNI path) run kernels/matmul.h's bf16 GEMM on rows dequantized to f32 (x and those rows
// rounded to bf16); everything else is dequantized to f32 a block of rows at a time and
// multiplied by OpenBLAS sgemm with f32 activations. quant_matmul_kernel names the one.
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

// x [T, K] f32 -> T * K / 256 BlockQ8_K (row t at out + t * K / 256). K % 256 == 0.
void quantize_activations_k(const float* x, int64_t T, int64_t K, quant::BlockQ8_K* out);

// x [T, K] f32; w [N, K] contiguous block dtype; y [T, N] f32 (+= when accumulate). Threads:
// ThreadPool::current(), split over rows of W. `path` must be one of quant_paths_available().
// T and every dimension below 2^31.
void quant_matmul(const float* x, int64_t T, const Tensor& w, float* y, bool accumulate,
                  QuantPath path);
inline void quant_matmul(const float* x, int64_t T, const Tensor& w, float* y,
                         bool accumulate = false) {
  quant_matmul(x, T, w, y, accumulate, quant_path());
}

// What quant_matmul runs for a weight of `type`, T tokens and `path`: "int8-gemm-avx512-vnni"
// (Q8_0 and Q4_0 from 16 tokens on that path), "int8-gemm-avx2" (Q4_0 from 16 tokens, Q4_K and
// Q6_K from 32, Q5_K from 48, Q8_0 from 64, on the AVX2 and AVX-VNNI paths), from T = 64
// "bf16-gemm-avx512" or
// "sgemm", otherwise "int8-" and the SIMD path that really runs ("int8-avx2" for the K formats on
// every SIMD path). For benchmarks and tests.
std::string quant_matmul_kernel(DType type, int64_t T, QuantPath path);

// The f32 baseline: each row of w dequantized to f32, then a plain dot product per token with the
// unquantized activations (what Q4_K / Q6_K ran before their integer kernels; kept to compare
// against in tests and benchmarks). Same arguments as quant_matmul.
void quant_matmul_dequant(const float* x, int64_t T, const Tensor& w, float* y,
                          bool accumulate = false);

// Load-time repacking of Q4_0 / Q8_0 / Q4_K / Q6_K weights for the AVX2 GEMV
// (docs/quantization.md): rows in groups of 4, per 32-column block (256 for the K formats) the
// group's 4 f16 scales together, then its codes (Q4_0: two rows' codes per byte, in column order;
// Q4_K: the 4 rows' 6-bit scale words side by side, then each row's codes; Q6_K: the 4 rows' plain
// blocks side by side). Same byte count as the plain layout; rows N - N % 4..N-1 stay plain.
// quant_matmul recognises a repacked tensor by its storage and gives results bit-identical to the
// plain weight's on the same path (Scalar and Avx2, and for the K formats every path; the VNNI
// paths run the repacked AVX2 kernel). Only the whole tensor may be multiplied: a view into it
// (slice_rows...) is refused, and nothing but quant_matmul / kernels::matmul reads the layout (no
// to(), no embedding lookups: repack linear weights only, after the TP split).
//
// repack_quant_weight: a new tensor (owned storage, same dtype and shape) in the repacked layout,
// or w itself when it is not a contiguous 2-D Q4_0 / Q8_0 / Q4_K / Q6_K weight of at least 4 rows
// (any other dtype included) or is repacked already.
Tensor repack_quant_weight(const Tensor& w);
bool is_repacked(const Tensor& w);
// Whether the model loader repacks weights of this dtype: PARALLM_REPACK is not 0 (PARALLM_REPACK=0
// turns it off; anything but 0 or 1 is an error) and the default quant_path() runs a repacked
// kernel for it: Q4_0 / Q8_0 / Q4_K / Q6_K on every SIMD path (all run the repacked AVX2 kernels:
// on a Zen 5 they beat the plain VNNI GEMVs by 1.3-2.3x, docs/benchmarks.md). False for every other
// dtype.
bool quant_repack_enabled(DType type);

}  // namespace parallm::kernels
