#include "parallm/core/quant.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "parallm/core/error.h"

namespace parallm::quant {

void check_blocks(DType type, int64_t n, const char* what) {
  if (!is_block(type)) fail("quant", what, ": ", dtype_name(type), " is not a block dtype");
  if (n < 0 || n % dtype_block(type) != 0)
    fail("quant", what, ": ", n, " values of ", dtype_name(type), " are not whole ",
         dtype_block(type), "-value blocks");
}

// v (a value in int8's range, or NaN) as an int8, NaN as nan_code. A block holding an inf has
// d = inf and 1 / d = 0, so x * (1 / d) is NaN at the inf; NaN activations do the same. Converting
// NaN to an integer is undefined; x86's conversion gives INT_MIN, and the AVX2 activation
// quantizers (kernels/quant_matmul.cpp) keep what the scalar code got from it: 0 for Q8_0 and
// Q4_0 (INT_MIN's low byte, passed here as nan_code), -127 for Q8_K (INT_MIN clamped, in
// quantize_q8_k), so every path writes the same bytes.
inline int8_t nan_or_int8(float v, int8_t nan_code) {
  return std::isnan(v) ? nan_code : static_cast<int8_t>(v);
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
    for (int j = 0; j < 32; ++j) y[b].qs[j] = nan_or_int8(std::roundf(xb[j] * id), 0);
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
      const int q0 = std::min(15, static_cast<int>(nan_or_int8(x0 + 8.5f, 0)));
      const int q1 = std::min(15, static_cast<int>(nan_or_int8(x1 + 8.5f, 0)));
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
        const float r = std::roundf(xb[j] * id);
        const int q = std::isnan(r) ? -127 : std::clamp(static_cast<int>(r), -127, 127);
        y[b].qs[j] = static_cast<int8_t>(q);
        s += q;
      }
      y[b].bsums[g] = static_cast<int16_t>(s);
    }
  }
}

namespace {

// The nearest integer to v in [lo, hi] (ties to even): v is clamped first, then rounded by adding
// and subtracting 1.5 x 2^23 (exact for |v| < 2^22; NaN gives lo). The scale fits call this millions of times
// per tensor; std::roundf is a library call here and made quantizing ~8x slower.
inline int code_in(float v, int lo, int hi) {
  constexpr float kMagic = 12582912.0f;  // 1.5 x 2^23
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  v = v >= flo ? (v <= fhi ? v : fhi) : flo;  // NaN -> lo
  return static_cast<int>((v + kMagic) - kMagic);
}

// Squared error of coding x[0, n) on the grid value = s * q - m, q = nearest code in [qlo, qhi].
float grid_error(const float* x, int n, float s, float m, int qlo, int qhi) {
  const float inv = s != 0.0f ? 1.0f / s : 0.0f;
  float e = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int q = code_in((x[i] + m) * inv, qlo, qhi);
    const float r = s * static_cast<float>(q) - m - x[i];
    e += r * r;
  }
  return e;
}

// A sub-block's scale s and offset m (value = s q - m, q in [0, qmax], m >= 0) that code x[0, n)
// with a small squared error: starting from the grid that just covers [min(x, 0), max(x)], codes
// are assigned (nearest) and (s, m) refitted by least squares, a few rounds, keeping the best.
void fit_asymmetric(const float* x, int n, int qmax, float* s_out, float* m_out) {
  float lo = 0.0f, hi = 0.0f;
  for (int i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  float s = (hi - lo) / static_cast<float>(qmax), m = -lo;
  float best = grid_error(x, n, s, m, 0, qmax), bs = s, bm = m;
  for (int round = 0; round < 4 && s > 0.0f; ++round) {
    // Least squares of x = s q - m over the current codes: the 2x2 normal equations.
    double sq = 0, sqq = 0, sx = 0, sqx = 0;
    const float inv = 1.0f / s;
    for (int i = 0; i < n; ++i) {
      const double q = code_in((x[i] + m) * inv, 0, qmax);
      sq += q;
      sqq += q * q;
      sx += x[i];
      sqx += q * x[i];
    }
    const double det = n * sqq - sq * sq;
    if (det <= 0) break;
    double ns = (n * sqx - sq * sx) / det, nm = (ns * sq - sx) / n;
    if (nm < 0) {  // the grid must start at or below 0: fit s alone with m = 0
      nm = 0;
      ns = sqq > 0 ? sqx / sqq : 0;
    }
    if (!(ns > 0)) break;
    s = static_cast<float>(ns);
    m = static_cast<float>(nm);
    const float e = grid_error(x, n, s, m, 0, qmax);
    if (e < best) {
      best = e;
      bs = s;
      bm = m;
    }
  }
  *s_out = bs;
  *m_out = bm;
}

// A sub-block's signed scale for codes in [-32, 31] (value = s q): the largest magnitude on -32,
// then smaller steps that clip it (up to 38 steps), then the least-squares scale of the best
// codes; the smallest squared error wins.
float fit_symmetric(const float* x, int n) {
  float big = 0.0f;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > std::fabs(big)) big = x[i];
  if (big == 0.0f) return 0.0f;
  float best_s = big / -32.0f, best = grid_error(x, n, best_s, 0.0f, -32, 31);
  for (int k = 1; k <= 12; ++k) {
    const float s = big / -(32.0f + 0.5f * static_cast<float>(k));
    const float e = grid_error(x, n, s, 0.0f, -32, 31);
    if (e < best) {
      best = e;
      best_s = s;
    }
  }
  double qq = 0, qx = 0;
  for (int i = 0; i < n; ++i) {
    const double q = code_in(x[i] / best_s, -32, 31);
    qq += q * q;
    qx += q * x[i];
  }
  if (qq > 0) {
    const float s = static_cast<float>(qx / qq);
    if (s != 0.0f && grid_error(x, n, s, 0.0f, -32, 31) < best) best_s = s;
  }
  return best_s;
}

uint8_t code6(float v, float d) {  // round(v / d) in [0, 63]
  return d > 0.0f ? static_cast<uint8_t>(std::clamp(std::roundf(v / d), 0.0f, 63.0f)) : 0;
}

// A Q4_K / Q5_K super-block (they share d, dmin and the 12 bytes of scales and mins): each
// sub-block's (s, m) fitted, stored as 6-bit codes of d and dmin, and every value's code on the
// stored grid (value = d*sc*q - dmin*m, the nearest q in [0, qmax]) into q[256].
template <class B>
void fit_kmin_block(const float* xb, int qmax, B& out, int* q) {
  float s[8], m[8], smax = 0.0f, mmax = 0.0f;
  for (int j = 0; j < 8; ++j) {
    fit_asymmetric(xb + 32 * j, 32, qmax, &s[j], &m[j]);
    smax = std::max(smax, s[j]);
    mmax = std::max(mmax, m[j]);
  }
  out.d = f32_to_f16(smax / 63.0f);
  out.dmin = f32_to_f16(mmax / 63.0f);
  const float d = f16_to_f32(out.d), dmin = f16_to_f32(out.dmin);
  uint8_t sc[8], mq[8];
  for (int j = 0; j < 8; ++j) {
    sc[j] = code6(s[j], d);
    mq[j] = code6(m[j], dmin);
  }
  // Pack (the inverse of scale_min_k4): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scale)
  // and 4-7 (min); sub-blocks 4-7 as nibbles of bytes 8-11, their top 2 bits in the top 2 bits
  // of bytes 0-3 (scale) and 4-7 (min).
  for (int j = 0; j < 4; ++j) {
    out.scales[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    out.scales[j + 4] = static_cast<uint8_t>((mq[j] & 63) | ((mq[j + 4] >> 4) << 6));
    out.scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((mq[j + 4] & 0xF) << 4));
  }
  for (int j = 0; j < 8; ++j) {
    const float step = d * static_cast<float>(sc[j]);
    const float off = dmin * static_cast<float>(mq[j]);
    const float inv = step > 0.0f ? 1.0f / step : 0.0f;
    for (int l = 0; l < 32; ++l) q[32 * j + l] = code_in((xb[32 * j + l] + off) * inv, 0, qmax);
  }
}

}  // namespace

namespace {
// A Q4_K / Q5_K block (B) from x[256]: the fitted scales, the low 4 bits of each code as nibbles
// (each 32 bytes a pair of sub-blocks, the first in the low nibbles) and, for Q5_K, bit 4 of value
// l of sub-block j as bit j of qh[l].
template <class B>
void quantize_kmin_block(const float* xb, B& out) {
  constexpr bool kQ5 = std::is_same_v<B, BlockQ5_K>;
  int q[256];
  fit_kmin_block(xb, kQ5 ? 31 : 15, out, q);
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l)
      out.qs[32 * c + l] =
          static_cast<uint8_t>((q[64 * c + l] & 0xF) | ((q[64 * c + 32 + l] & 0xF) << 4));
  if constexpr (kQ5)
    for (int l = 0; l < 32; ++l) {
      int h = 0;
      for (int j = 0; j < 8; ++j) h |= (q[32 * j + l] >> 4) << j;
      out.qh[l] = static_cast<uint8_t>(h);
    }
}
}  // namespace

void quantize_q4_k(const float* x, BlockQ4_K* y, int64_t n) {
  check_blocks(DType::Q4_K, n, "quantize_q4_k");
  for (int64_t b = 0; b < n / 256; ++b) quantize_kmin_block(x + b * 256, y[b]);
}

void quantize_q5_k(const float* x, BlockQ5_K* y, int64_t n) {
  check_blocks(DType::Q5_K, n, "quantize_q5_k");
  for (int64_t b = 0; b < n / 256; ++b) quantize_kmin_block(x + b * 256, y[b]);
}

void quantize_q6_k(const float* x, BlockQ6_K* y, int64_t n) {
  check_blocks(DType::Q6_K, n, "quantize_q6_k");
  for (int64_t b = 0; b < n / 256; ++b) {
    const float* xb = x + b * 256;
    float s[16], amax = 0.0f;
    for (int j = 0; j < 16; ++j) {
      s[j] = fit_symmetric(xb + 16 * j, 16);
      amax = std::max(amax, std::fabs(s[j]));
    }
    // int8 sub-block scales of d (f16).
    BlockQ6_K& out = y[b];
    out.d = f32_to_f16(amax / 127.0f);
    const float d = f16_to_f32(out.d);
    for (int j = 0; j < 16; ++j)
      out.scales[j] = static_cast<int8_t>(
          d > 0.0f ? std::clamp(std::roundf(s[j] / d), -128.0f, 127.0f) : 0.0f);
    int q[256];  // codes 0..63 (value = d * sc * (q - 32)): the nearest on the stored grid
    for (int j = 0; j < 16; ++j) {
      const float step = d * static_cast<float>(out.scales[j]);
      const float inv = step != 0.0f ? 1.0f / step : 0.0f;
      for (int l = 0; l < 16; ++l)
        q[16 * j + l] = code_in(xb[16 * j + l] * inv, -32, 31) + 32;
    }
    // Pack (the inverse of dequant_q6_k): per half of 128 values, value l (0..31) and l + 64 share
    // byte l of ql (low and high nibble), l + 32 and l + 96 byte l + 32; the top 2 bits of l,
    // l + 32, l + 64, l + 96 are bits 0-1, 2-3, 4-5, 6-7 of qh byte l.
    for (int half = 0; half < 2; ++half) {
      const int* qv = q + 128 * half;
      uint8_t* ql = out.ql + 64 * half;
      uint8_t* qh = out.qh + 32 * half;
      for (int l = 0; l < 32; ++l) {
        ql[l] = static_cast<uint8_t>((qv[l] & 0xF) | ((qv[l + 64] & 0xF) << 4));
        ql[l + 32] = static_cast<uint8_t>((qv[l + 32] & 0xF) | ((qv[l + 96] & 0xF) << 4));
        qh[l] = static_cast<uint8_t>((qv[l] >> 4) | ((qv[l + 32] >> 4) << 2) |
                                     ((qv[l + 64] >> 4) << 4) | ((qv[l + 96] >> 4) << 6));
      }
    }
  }
}

void quantize(DType type, const float* x, void* blocks, int64_t n) {
  if (type == DType::Q8_0) return quantize_q8_0(x, static_cast<BlockQ8_0*>(blocks), n);
  if (type == DType::Q4_0) return quantize_q4_0(x, static_cast<BlockQ4_0*>(blocks), n);
  if (type == DType::Q4_K) return quantize_q4_k(x, static_cast<BlockQ4_K*>(blocks), n);
  if (type == DType::Q5_K) return quantize_q5_k(x, static_cast<BlockQ5_K*>(blocks), n);
  if (type == DType::Q6_K) return quantize_q6_k(x, static_cast<BlockQ6_K*>(blocks), n);
  fail("quant", "quantizing to ", dtype_name(type), " is not supported");
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

// Q4_K and Q5_K (B): the nibbles, and for Q5_K bit `is` of qh[l] as bit 4 of value l of
// sub-block `is`.
template <class B>
void dequant_kmin(const B* x, float* y, int64_t nb) {
  constexpr bool kQ5 = std::is_same_v<B, BlockQ5_K>;
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
      auto high = [&](int l, int sub) -> int {
        if constexpr (kQ5) return ((x[b].qh[l] >> sub) & 1) << 4;
        (void)l;
        (void)sub;
        return 0;
      };
      for (int l = 0; l < 32; ++l)
        *out++ = d1 * static_cast<float>((q[l] & 0xF) | high(l, is)) - m1;
      for (int l = 0; l < 32; ++l)
        *out++ = d2 * static_cast<float>((q[l] >> 4) | high(l, is + 1)) - m2;
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
      return dequant_kmin(static_cast<const BlockQ4_K*>(blocks), y, nb);
    case DType::Q5_K:
      return dequant_kmin(static_cast<const BlockQ5_K*>(blocks), y, nb);
    case DType::Q6_K:
      return dequant_q6_k(static_cast<const BlockQ6_K*>(blocks), y, nb);
    default:
      break;
  }
}

}  // namespace parallm::quant
