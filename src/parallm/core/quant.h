// llama.cpp's block-quantized weight formats (the published ggml layouts, little-endian), their
// dequantization, and quantizers for each.
//
//   Q8_0  32 values, 34 bytes: f16 scale d, then 32 int8 q;            value = q * d
//   Q4_0  32 values, 18 bytes: f16 scale d, then 16 bytes of nibbles: byte j holds value j in its
//         low nibble and value j + 16 in its high nibble;              value = (q - 8) * d
//   Q4_K  256 values, 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8
//         sub-blocks of 32, 128 bytes of nibbles (each 32 bytes: a pair of sub-blocks, the first
//         in the low nibbles);                                          value = d*sc*q - dmin*m
//   Q5_K  256 values, 176 bytes: f16 d, f16 dmin, 12 bytes of scales and mins as Q4_K, 32 bytes
//         of fifth bits (byte l, bit j: value l of sub-block j), 128 bytes of low nibbles as Q4_K;
//                                                                       value = d*sc*q - dmin*m
//   Q6_K  256 values, 210 bytes: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8
//         scales (one per 16 values), f16 d;                            value = d * sc * (q - 32)
//
// Every function works on whole blocks: n (values) must be a multiple of dtype_block(type).
// Dequantization does the arithmetic in llama.cpp's order in f32 (no fused multiply-add), so it is
// bit-exact against tests/reference/quant_ref.py.
#pragma once

#include <cstdint>

#include "parallm/core/dtype.h"

namespace parallm::quant {

struct BlockQ8_0 {
  uint16_t d;  // f16
  int8_t qs[32];
};
struct BlockQ4_0 {
  uint16_t d;  // f16
  uint8_t qs[16];
};
struct BlockQ4_K {
  uint16_t d;     // f16, scale of the sub-block scales
  uint16_t dmin;  // f16, scale of the sub-block mins
  uint8_t scales[12];
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d;     // f16, scale of the sub-block scales
  uint16_t dmin;  // f16, scale of the sub-block mins
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;  // f16
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

// Activations for the K-format integer kernels (kernels/quant_matmul.h), never stored in a file:
// 256 values as an f32 scale d and int8 codes (value ~ q * d, |q| <= 127), with the sum of each
// group of 16 codes kept so that the kernels can apply Q4_K's mins and Q6_K's offset of 32 per
// sub-block without touching the codes again.
struct BlockQ8_K {
  float d;
  int8_t qs[256];
  int16_t bsums[16];  // bsums[g] = sum of qs[16 g .. 16 g + 15], |bsums| <= 16 x 127
};
static_assert(sizeof(BlockQ8_K) == 292);

// x[n] -> n / 32 blocks. Q8_0: d = max|x| / 127, q = round(x / d) (half away from zero).
// Q4_0: d = m / -8 where m is the value of largest magnitude (its sign kept), q = min(15,
// trunc(x / d + 8.5)). An all-zero block gets d = 0 and zero codes.
void quantize_q8_0(const float* x, BlockQ8_0* y, int64_t n);
void quantize_q4_0(const float* x, BlockQ4_0* y, int64_t n);
// x[n] -> n / 256 BlockQ8_K: d = max|x| / 127, q = round(x / d) (half away from zero); an
// all-zero block gets d = 0 and zero codes.
void quantize_q8_k(const float* x, BlockQ8_K* y, int64_t n);
// x[n] -> n / 256 blocks. Each sub-block's scale (and Q4_K's offset) is fitted to its values:
// Q4_K and Q5_K (value = s q - m, q in [0, 15] or [0, 31], m >= 0): from the grid that just covers
// [min(x, 0), max x], codes and a least-squares (s, m) alternate for a few rounds; Q6_K (value = s
// q, q in [-32, 31]): the largest magnitude on -32, then smaller steps that clip it, then the
// least-squares scale. The fitted values are stored as 6-bit (Q4_K, Q5_K) or int8 (Q6_K) codes of
// f16 super-block scales, and every value gets the nearest code on the grid so stored. The error is
// what a search of this kind gives (written here from the formats; llama.cpp's own search differs
// in its details).
void quantize_q4_k(const float* x, BlockQ4_K* y, int64_t n);
void quantize_q5_k(const float* x, BlockQ5_K* y, int64_t n);
void quantize_q6_k(const float* x, BlockQ6_K* y, int64_t n);
// Q8_0, Q4_0, Q4_K, Q5_K or Q6_K (std::invalid_argument for any other dtype).
void quantize(DType type, const float* x, void* blocks, int64_t n);

// blocks of `type` (any block dtype) -> y[n].
void dequantize(DType type, const void* blocks, float* y, int64_t n);

// Throws std::invalid_argument naming `what` unless n is a multiple of type's block.
void check_blocks(DType type, int64_t n, const char* what);

}  // namespace parallm::quant
