// Element types of tensors and the conversions between them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace parallm {

// F32, BF16, F16: floating point, convertible into each other, reducible in collectives.
// I32, I64, U8: copy-only integer data (token ids, candidate ids, flags, bytes): they travel
// through copies, gathers, broadcasts and point-to-point exactly, but convert() only copies them to
// the same dtype and collectives refuse to reduce them. Q8_0, Q4_0, Q4_K, Q6_K, Q5_K: llama.cpp's
// block-quantized weights (core/quant.h). A tensor's shape counts values as for any dtype, but its
// bytes come in blocks of dtype_block(t) values along the last dimension (which must be a multiple
// of it). convert() dequantizes them to a float dtype and quantizes f32/bf16/f16 to each of them
// (core/quant.h); collectives refuse to reduce them. (Q5_K came last and stays there: the numbers
// of the others are unchanged.)
enum class DType : uint8_t { F32, BF16, F16, I32, I64, U8, Q8_0, Q4_0, Q4_K, Q6_K, Q5_K };

// True for F32, BF16 and F16.
bool is_float(DType t);
// True for the block-quantized dtypes.
inline bool is_block(DType t) { return t >= DType::Q8_0; }
// Values per block: 32 (Q8_0, Q4_0), 256 (Q4_K, Q6_K, Q5_K), 1 for the element dtypes.
inline int64_t dtype_block(DType t) {
  return t == DType::Q8_0 || t == DType::Q4_0                       ? 32
         : t == DType::Q4_K || t == DType::Q6_K || t == DType::Q5_K ? 256
                                                                    : 1;
}

// Bytes of one element, or of one block for the block dtypes (34, 18, 144, 210, 176).
size_t dtype_size(DType t);
// Bytes of n values (for a block dtype n must be a multiple of dtype_block: n / block blocks).
inline size_t dtype_bytes(DType t, int64_t n) {
  return static_cast<size_t>(n / dtype_block(t)) * dtype_size(t);
}
// "f32", "bf16", "f16", "i32", "i64", "u8", "q8_0", "q4_0", "q4_k", "q6_k", "q5_k"
std::string_view dtype_name(DType t);
// Accepts our names and safetensors' ("F32", "BF16", "F16") and torch's ("float32", "bfloat16",
// "float16"); throws std::invalid_argument naming `what` and the value otherwise.
DType parse_dtype(std::string_view s, std::string_view what = "dtype");

// bf16: the top 16 bits of an IEEE f32. Rounds to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

// Converts n elements between any two float dtypes (same dtype of any kind: memcpy), from a block
// dtype to a float one (dequantization) and from a float dtype to a block one (quant::quantize);
// n must then be a multiple of the block. Throws std::invalid_argument for a conversion to or from
// an integer dtype.
void convert(const void* src, DType src_type, void* dst, DType dst_type, size_t n);

}  // namespace parallm
