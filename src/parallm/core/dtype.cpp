#include "parallm/core/dtype.h"

#include <algorithm>
#include <cmath>

#include "parallm/core/error.h"
#include "parallm/core/quant.h"

namespace parallm {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::BF16:
    case DType::F16:
      return 2;
    case DType::I32:
      return 4;
    case DType::I64:
      return 8;
    case DType::U8:
      return 1;
    case DType::Q8_0:
      return 34;
    case DType::Q4_0:
      return 18;
    case DType::Q4_K:
      return 144;
    case DType::Q6_K:
      return 210;
    case DType::Q5_K:
      return 176;
  }
  return 0;
}

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "f32";
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "f16";
    case DType::I32:
      return "i32";
    case DType::I64:
      return "i64";
    case DType::U8:
      return "u8";
    case DType::Q8_0:
      return "q8_0";
    case DType::Q4_0:
      return "q4_0";
    case DType::Q4_K:
      return "q4_k";
    case DType::Q6_K:
      return "q6_k";
    case DType::Q5_K:
      return "q5_k";
  }
  return "?";
}

DType parse_dtype(std::string_view s, std::string_view what) {
  if (s == "f32" || s == "F32" || s == "float32" || s == "float") return DType::F32;
  if (s == "bf16" || s == "BF16" || s == "bfloat16") return DType::BF16;
  if (s == "f16" || s == "F16" || s == "float16" || s == "half") return DType::F16;
  if (s == "i32" || s == "I32" || s == "int32") return DType::I32;
  if (s == "i64" || s == "I64" || s == "int64") return DType::I64;
  if (s == "u8" || s == "U8" || s == "uint8") return DType::U8;
  if (s == "q8_0" || s == "Q8_0") return DType::Q8_0;
  if (s == "q4_0" || s == "Q4_0") return DType::Q4_0;
  if (s == "q4_k" || s == "Q4_K") return DType::Q4_K;
  if (s == "q6_k" || s == "Q6_K") return DType::Q6_K;
  if (s == "q5_k" || s == "Q5_K") return DType::Q5_K;
  fail("dtype", what, ": unsupported dtype \"", s,
       "\" (expected f32, bf16, f16, i32, i64, u8, q8_0, q4_0, q4_k, q6_k or q5_k)");
}

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // f16 subnormal or zero: units of 2^-24, rounded to nearest even
    float a;
    std::memcpy(&a, &abs, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t out;
  if (e == 0) {
    if (m == 0) {
      out = sign;
    } else {  // subnormal: normalise
      e = 127 - 15 + 1;
      while ((m & 0x400u) == 0) {
        m <<= 1;
        --e;
      }
      m &= 0x3ffu;
      out = sign | (e << 23) | (m << 13);
    }
  } else if (e == 31) {
    out = sign | 0x7f800000u | (m << 13);
  } else {
    out = sign | ((e + 127 - 15) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

void convert(const void* src, DType st, void* dst, DType dt, size_t n) {
  if (is_block(st) || is_block(dt)) {
    const int64_t block = std::max(dtype_block(st), dtype_block(dt));
    if (static_cast<int64_t>(n) % block != 0)
      fail("dtype", "cannot convert ", n, " values of ", dtype_name(st), " to ", dtype_name(dt),
           ": not a multiple of the ", block, "-value block");
  }
  if (st == dt) {
    std::memcpy(dst, src, dtype_bytes(st, static_cast<int64_t>(n)));
    return;
  }
  if (is_block(st) && is_float(dt)) {
    // Dequantize a chunk of blocks at a time into f32, then narrow.
    constexpr int64_t kChunk = 4096;  // a multiple of every block
    float buf[kChunk];
    for (size_t i = 0; i < n; i += kChunk) {
      const int64_t m = std::min<int64_t>(kChunk, static_cast<int64_t>(n - i));
      const char* blocks = static_cast<const char*>(src) + dtype_bytes(st, static_cast<int64_t>(i));
      quant::dequantize(st, blocks, buf, m);
      convert(buf, DType::F32, static_cast<char*>(dst) + i * dtype_size(dt), dt,
              static_cast<size_t>(m));
    }
    return;
  }
  if (is_float(st) && is_block(dt)) {
    constexpr int64_t kChunk = 4096;
    float buf[kChunk];
    for (size_t i = 0; i < n; i += kChunk) {
      const int64_t m = std::min<int64_t>(kChunk, static_cast<int64_t>(n - i));
      convert(static_cast<const char*>(src) + i * dtype_size(st), st, buf, DType::F32,
              static_cast<size_t>(m));
      quant::quantize(dt, buf, static_cast<char*>(dst) + dtype_bytes(dt, static_cast<int64_t>(i)),
                      m);
    }
    return;
  }
  if (!is_float(st) || !is_float(dt))
    fail("dtype", "cannot convert ", dtype_name(st), " to ", dtype_name(dt),
         " (integer dtypes are copy-only)");
  auto load = [&](size_t i) -> float {
    switch (st) {
      case DType::F32:
        return static_cast<const float*>(src)[i];
      case DType::BF16:
        return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
      case DType::F16:
        return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
      default:
        return 0.0f;  // unreachable: integers were refused above
    }
  };
  for (size_t i = 0; i < n; ++i) {
    const float v = load(i);
    switch (dt) {
      case DType::F32:
        static_cast<float*>(dst)[i] = v;
        break;
      case DType::BF16:
        static_cast<uint16_t*>(dst)[i] = f32_to_bf16(v);
        break;
      case DType::F16:
        static_cast<uint16_t*>(dst)[i] = f32_to_f16(v);
        break;
      default:
        break;  // unreachable: integers were refused above
    }
  }
}

}  // namespace parallm
