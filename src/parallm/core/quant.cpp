#include "parallm/core/quant.h"

#include <algorithm>
#include <cmath>

#include "parallm/core/error.h"

namespace parallm::quant {

void check_blocks(DType type, int64_t n, const char* what) {
  if (!is_block(type)) fail("quant", what, ": ", dtype_name(type), " is not a block dtype");
  if (n < 0 || n % dtype_block(type) != 0)
    fail("quant", what, ": ", n, " values of ", dtype_name(type), " are not whole ",
         dtype_block(type), "-value blocks");
}

void quantize_q8_0(const float* x, BlockQ8_0* y, int64_t n) {
  check_blocks(DType::Q8_0, n, "quantize_q8_0");
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = f32_to_f16(d);
    for (int j = 0; j < 32; ++j) y[b].qs[j] = static_cast<int8_t>(std::roundf(xb[j] * id));
  }
}

void quantize_q4_0(const float* x, BlockQ4_0* y, int64_t n) {
  check_blocks(DType::Q4_0, n, "quantize_q4_0");
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j)
      if (amax < std::fabs(xb[j])) {
        amax = std::fabs(xb[j]);
        max = xb[j];
      }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = f32_to_f16(d);
    for (int j = 0; j < 16; ++j) {
      const float x0 = xb[j] * id, x1 = xb[16 + j] * id;
      const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x0 + 8.5f)));
      const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x1 + 8.5f)));
      y[b].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

void quantize_q8_k(const float* x, BlockQ8_K* y, int64_t n) {
  if (n < 0 || n % 256 != 0)
    fail("quant", "quantize_q8_k: ", n, " values are not whole 256-value blocks");
  for (int64_t b = 0; b < n / 256; ++b) {
    const float* xb = x + b * 256;
    float amax = 0.0f;
    for (int j = 0; j < 256; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = d;
    for (int g = 0; g < 16; ++g) {
      int s = 0;
      for (int j = 16 * g; j < 16 * g + 16; ++j) {
        // x * (1 / d) may land a rounding step above 127 at the largest value: clamp.
        const int q = std::clamp(static_cast<int>(std::roundf(xb[j] * id)), -127, 127);
        y[b].qs[j] = static_cast<int8_t>(q);
        s += q;
      }
      y[b].bsums[g] = static_cast<int16_t>(s);
    }
  }
}

void quantize(DType type, const float* x, void* blocks, int64_t n) {
  if (type == DType::Q8_0) return quantize_q8_0(x, static_cast<BlockQ8_0*>(blocks), n);
  if (type == DType::Q4_0) return quantize_q4_0(x, static_cast<BlockQ4_0*>(blocks), n);
  fail("quant", "quantizing to ", dtype_name(type), " is not supported (q8_0 and q4_0 are)");
}

namespace {

// Q4_K's 6-bit scale and min of sub-block j (0..7) from its 12 packed bytes.
void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

void dequant_q8_0(const BlockQ8_0* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = f16_to_f32(x[b].d);
    for (int j = 0; j < 32; ++j) y[b * 32 + j] = static_cast<float>(x[b].qs[j]) * d;
  }
}

void dequant_q4_0(const BlockQ4_0* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = f16_to_f32(x[b].d);
    for (int j = 0; j < 16; ++j) {
      y[b * 32 + j] = static_cast<float>((x[b].qs[j] & 0xF) - 8) * d;
      y[b * 32 + j + 16] = static_cast<float>((x[b].qs[j] >> 4) - 8) * d;
    }
  }
}

void dequant_q4_k(const BlockQ4_K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = f16_to_f32(x[b].d), dmin = f16_to_f32(x[b].dmin);
    const uint8_t* q = x[b].qs;
    float* out = y + b * 256;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
      uint8_t sc, m;
      scale_min_k4(is, x[b].scales, &sc, &m);
      const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
      scale_min_k4(is + 1, x[b].scales, &sc, &m);
      const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) *out++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *out++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

void dequant_q6_k(const BlockQ6_K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = f16_to_f32(x[b].d);
    const uint8_t* ql = x[b].ql;
    const uint8_t* qh = x[b].qh;
    const int8_t* sc = x[b].scales;
    float* out = y + b * 256;
    for (int n = 0; n < 256; n += 128, out += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
        out[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        out[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        out[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

}  // namespace

void dequantize(DType type, const void* blocks, float* y, int64_t n) {
  check_blocks(type, n, "dequantize");
  const int64_t nb = n / dtype_block(type);
  switch (type) {
    case DType::Q8_0:
      return dequant_q8_0(static_cast<const BlockQ8_0*>(blocks), y, nb);
    case DType::Q4_0:
      return dequant_q4_0(static_cast<const BlockQ4_0*>(blocks), y, nb);
    case DType::Q4_K:
      return dequant_q4_k(static_cast<const BlockQ4_K*>(blocks), y, nb);
    case DType::Q6_K:
      return dequant_q6_k(static_cast<const BlockQ6_K*>(blocks), y, nb);
    default:
      break;
  }
}

}  // namespace parallm::quant
