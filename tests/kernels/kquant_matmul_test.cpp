// Q4_K / Q5_K / Q6_K integer kernels (kernels/quant_matmul.h): every SIMD path bit-identical to the
// plain reference, within the NMSE bound of issue 15 of the f32 product, and equal to an exact
// int64 product on codes chosen so that nothing rounds (a wrong scale, min or code index fails
// there); extreme codes and scales (i16 saturation); kernels::matmul takes the integer path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "kernel_test_util.h"
#include "parallm/core/error.h"
#include "parallm/core/quant.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/matmul.h"
#include "parallm/kernels/quant_matmul.h"

namespace parallm::kernels {
namespace {

using quant::BlockQ4_K;
using quant::BlockQ5_K;
using quant::BlockQ6_K;

// sum (a - b)^2 / sum b^2
double nmse(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return num / den;
}

// Valid blocks with random codes and random 6-bit (Q4_K, Q5_K) or int8 (Q6_K) scales. d (and dmin)
// are f16 values drawn from [dlo, dhi] per block, or exactly `fixed` when fixed > 0.
Tensor random_kweights(DType t, int64_t N, int64_t K, uint32_t seed, float fixed = 0.0f) {
  Tensor w = Tensor::empty(t, {N, K});
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dd(0.002f, 0.02f);
  auto f16 = [&] { return f32_to_f16(fixed > 0 ? fixed : dd(rng)); };
  const int64_t nb = N * K / 256;
  if (t == DType::Q4_K) {
    auto* b = static_cast<BlockQ4_K*>(w.raw());
    for (int64_t i = 0; i < nb; ++i) {
      b[i].d = f16();
      b[i].dmin = f16();
      for (uint8_t& v : b[i].scales) v = static_cast<uint8_t>(rng());  // any 12 bytes are valid
      for (uint8_t& v : b[i].qs) v = static_cast<uint8_t>(rng());
    }
  } else if (t == DType::Q5_K) {
    auto* b = static_cast<BlockQ5_K*>(w.raw());
    for (int64_t i = 0; i < nb; ++i) {
      b[i].d = f16();
      b[i].dmin = f16();
      for (uint8_t& v : b[i].scales) v = static_cast<uint8_t>(rng());
      for (uint8_t& v : b[i].qh) v = static_cast<uint8_t>(rng());
      for (uint8_t& v : b[i].qs) v = static_cast<uint8_t>(rng());
    }
  } else {
    auto* b = static_cast<BlockQ6_K*>(w.raw());
    for (int64_t i = 0; i < nb; ++i) {
      for (uint8_t& v : b[i].ql) v = static_cast<uint8_t>(rng());
      for (uint8_t& v : b[i].qh) v = static_cast<uint8_t>(rng());
      for (int8_t& v : b[i].scales) v = static_cast<int8_t>(rng());  // -128..127
      b[i].d = f16();
    }
  }
  return w;
}

std::vector<float> dequantized(const Tensor& w) {
  std::vector<float> f(static_cast<size_t>(w.numel()));
  quant::dequantize(w.dtype(), w.raw(), f.data(), w.numel());
  return f;
}

struct Case {
  DType type;
  int64_t N, K, T;
};

class KQuantMatmul : public ::testing::TestWithParam<Case> {};

TEST_P(KQuantMatmul, PathsBitIdenticalAndWithinNmseOfF32) {
  const Case c = GetParam();
  const Tensor w = random_kweights(c.type, c.N, c.K, 21);
  const std::vector<float> x = testing::random_vec(static_cast<size_t>(c.T * c.K), 22);
  std::vector<float> ref(static_cast<size_t>(c.T * c.N));
  matmul_ref(x.data(), c.T, w, ref.data());  // f32: dequantized weights, unquantized activations
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  std::vector<float> plain(ref.size());
  quant_matmul(x.data(), c.T, w, plain.data(), false, QuantPath::Scalar);
  EXPECT_EQ(quant_matmul_kernel(c.type, c.T, QuantPath::Scalar), "int8-scalar");
  for (QuantPath p : quant_paths_available()) {
    SCOPED_TRACE(quant_path_name(p));
    if (p != QuantPath::Scalar) {
      EXPECT_EQ(quant_matmul_kernel(c.type, c.T, p), "int8-avx2");
    }
    std::vector<float> y(ref.size(), 7.0f);
    quant_matmul(x.data(), c.T, w, y.data(), false, p);
    const double e = nmse(y, ref);
    EXPECT_LE(e, 5e-4);
    // The same int32 sums combined by the same f32 operations: bit-identical to the reference.
    for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], plain[i]) << i;
    std::vector<float> acc(ref.size(), 1.0f);
    quant_matmul(x.data(), c.T, w, acc.data(), true, p);
    for (size_t i = 0; i < acc.size(); ++i) ASSERT_EQ(acc[i], 1.0f + y[i]) << i;
    if (c.N == 67 && c.T == 1)
      std::printf("[ kquant ] %s %s NMSE %.2e\n", std::string(dtype_name(c.type)).c_str(),
                  quant_path_name(p).c_str(), e);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, KQuantMatmul,
    ::testing::Values(Case{DType::Q4_K, 67, 256, 1}, Case{DType::Q4_K, 5, 512, 2},
                      Case{DType::Q4_K, 130, 2048, 3}, Case{DType::Q4_K, 9, 768, 7},
                      Case{DType::Q5_K, 67, 256, 1}, Case{DType::Q5_K, 7, 512, 2},
                      Case{DType::Q5_K, 130, 2048, 3}, Case{DType::Q5_K, 10, 768, 7},
                      Case{DType::Q6_K, 67, 256, 1}, Case{DType::Q6_K, 6, 512, 2},
                      Case{DType::Q6_K, 130, 2048, 3}, Case{DType::Q6_K, 11, 768, 7}),
    [](const auto& info) {
      const Case& c = info.param;
      return cat(dtype_name(c.type), "_N", c.N, "_K", c.K, "_T", c.T);
    });

TEST(KQuantMatmul, IntegerSumsAreExact) {
  // d = dmin = 1 and integer activations with max |x| = 127 in every 256 values: the activation
  // scale is exactly 1 and its codes are x itself, so y must equal the int64 product of the
  // dequantized weights (integers sc q - m, or sc (q - 32)) with x. Small |x| elsewhere keeps
  // every partial sum below 2^24, where f32 is exact (Q4_K: per super-block <= 255 x 63 x 15 x 8
  // + 63 x 15 x 127 + 63 x (255 x 8 + 127) = 2.2e6, x 4 blocks; Q5_K: <= 255 x 63 x 31 x 4 +
  // 63 x 31 x 127 + 63 x (255 x 4 + 127) = 2.3e6, x 4 blocks; Q6_K: <= 255 x 128 x 32 x 4 +
  // 128 x 32 x 127 = 4.7e6, x 2 blocks).
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    const int64_t N = 6, K = t == DType::Q6_K ? 512 : 1024, T = 3;
    const int small = t == DType::Q4_K ? 8 : 4;
    const Tensor w = random_kweights(t, N, K, 31, 1.0f);
    const std::vector<float> wf = dequantized(w);
    std::mt19937 rng(32);
    std::vector<float> x(static_cast<size_t>(T * K));
    for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % (2 * small + 1)) - small);
    for (int64_t b = 0; b < T * K / 256; ++b)
      x[static_cast<size_t>(b * 256 + rng() % 256)] = rng() % 2 ? 127.0f : -127.0f;
    std::vector<int64_t> ref(static_cast<size_t>(T * N));
    for (int64_t tt = 0; tt < T; ++tt)
      for (int64_t n = 0; n < N; ++n) {
        int64_t s = 0;
        for (int64_t k = 0; k < K; ++k) {
          const float v = wf[n * K + k];
          ASSERT_EQ(v, std::nearbyint(v));  // the dequantized weights are integers here
          s += static_cast<int64_t>(v) * static_cast<int64_t>(x[tt * K + k]);
        }
        ASSERT_LT(std::llabs(s), int64_t{1} << 24);
        ref[tt * N + n] = s;
      }
    for (QuantPath p : quant_paths_available()) {
      SCOPED_TRACE(quant_path_name(p));
      std::vector<float> y(ref.size());
      quant_matmul(x.data(), T, w, y.data(), false, p);
      for (size_t i = 0; i < y.size(); ++i) EXPECT_EQ(y[i], static_cast<float>(ref[i])) << i;
    }
  }
}

TEST(KQuantMatmul, ExtremeCodesAndScalesDoNotSaturate) {
  // Largest codes, scales and mins against activations of +-127 (maddubs's i16 pair sums reach
  // 2 x 15 x 127 for Q4_K, 2 x 31 x 127 for Q5_K and 2 x 63 x 127 for Q6_K; the Q6_K scale -128
  // is possible in a file):
  // every path equal to the reference and within 1e-6 of the double product.
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  const int64_t N = 5, K = 512;
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K})
    for (int fill : {0x00, 0xFF}) {
      SCOPED_TRACE(cat(dtype_name(t), " fill ", fill));
      Tensor w = random_kweights(t, N, K, 41, 1.0f);
      if (t == DType::Q4_K) {
        auto* b = static_cast<BlockQ4_K*>(w.raw());
        for (int64_t i = 0; i < N * K / 256; ++i) {
          std::memset(b[i].qs, fill, sizeof b[i].qs);
          std::memset(b[i].scales, 0xFF, sizeof b[i].scales);  // every scale and min 63
        }
      } else if (t == DType::Q5_K) {
        auto* b = static_cast<BlockQ5_K*>(w.raw());
        for (int64_t i = 0; i < N * K / 256; ++i) {
          std::memset(b[i].qs, fill, sizeof b[i].qs);
          std::memset(b[i].qh, fill, sizeof b[i].qh);
          std::memset(b[i].scales, 0xFF, sizeof b[i].scales);
        }
      } else {
        auto* b = static_cast<BlockQ6_K*>(w.raw());
        for (int64_t i = 0; i < N * K / 256; ++i) {
          std::memset(b[i].ql, fill, sizeof b[i].ql);
          std::memset(b[i].qh, fill, sizeof b[i].qh);
          for (int g = 0; g < 16; ++g) b[i].scales[g] = static_cast<int8_t>(g % 2 ? -128 : 127);
        }
      }
      const std::vector<float> wf = dequantized(w);
      for (float sign : {1.0f, -1.0f}) {
        std::vector<float> x(K, sign);  // codes +-127, scale 1/127
        std::vector<float> plain(N);
        quant_matmul(x.data(), 1, w, plain.data(), false, QuantPath::Scalar);
        for (int64_t n = 0; n < N; ++n) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k) s += static_cast<double>(wf[n * K + k]) * x[k];
          EXPECT_NEAR(plain[n], s, 1e-6 * std::max(1.0, std::fabs(s))) << n;
        }
        for (QuantPath p : quant_paths_available()) {
          std::vector<float> y(N);
          quant_matmul(x.data(), 1, w, y.data(), false, p);
          for (int64_t n = 0; n < N; ++n) EXPECT_EQ(y[n], plain[n]) << quant_path_name(p);
        }
      }
    }
}

TEST(KQuantMatmul, MatmulTakesTheIntegerPath) {
  // kernels::matmul on a Q4_K weight at T = 1: exactly quant_matmul's integer result, within the
  // NMSE bound of the f32 baseline, and not the baseline itself (activations quantized to 8 bits).
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    const Tensor w = random_kweights(t, 37, 1024, 51);
    const std::vector<float> x = testing::random_vec(1024, 52);
    std::vector<float> via(37), direct(37), base(37);
    matmul(x.data(), 1, w, via.data());
    quant_matmul(x.data(), 1, w, direct.data(), false, quant_path());
    quant_matmul_dequant(x.data(), 1, w, base.data());
    for (int i = 0; i < 37; ++i) ASSERT_EQ(via[i], direct[i]) << i;
    EXPECT_LE(nmse(via, base), 5e-4);
    EXPECT_GT(testing::normalised_error(via, base), 0.0);
    EXPECT_EQ(quant_matmul_kernel(t, 1, quant_path()).rfind("int8-", 0), 0u);
    const bool avx2_gemm = quant_path() == QuantPath::Avx2 || quant_path() == QuantPath::AvxVnni;
    EXPECT_EQ(quant_matmul_kernel(t, 64, quant_path()), avx2_gemm               ? "int8-gemm-avx2"
                                                        : bf16_gemm_available() ? "bf16-gemm-avx512"
                                                                                : "sgemm");
  }
}

TEST(KQuantMatmul, PrefillGemmOnAvx2IsThePlainReferenceBitForBit) {
  // From 32 tokens (Q5_K: 48) on the AVX2 and AVX-VNNI paths, Q4_K, Q5_K and Q6_K run an int8 GEMM
  // over 32-row panels (codes x x summed in int16, scaled in int32; Q4_K's mins and Q6_K's -32 by
  // vpmaddwd against the group sums): the reference's integer sums, combined with its fmas in its
  // order, so every output equals the scalar GEMV's bit for bit. N = 45 (a whole panel, then one of
  // 13 rows: a partial 16-row half), T = 67 (tiles of 2 tokens and one of 1), plain and repacked
  // weights, accumulate; and the largest codes and scales against activations of +-127 (no
  // int16 saturation: Q6_K's two quads of 63 x 127 pairs sum to 32004, Q5_K's four quads of
  // 31 x 127 pairs to 31496).
  for (DType type : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(type)));
    for (QuantPath path : {QuantPath::Avx2, QuantPath::AvxVnni}) {
      SCOPED_TRACE(quant_path_name(path));
      const int64_t from = type == DType::Q5_K ? 48 : 32;
      EXPECT_EQ(quant_matmul_kernel(type, from, path), "int8-gemm-avx2");
      EXPECT_EQ(quant_matmul_kernel(type, from - 1, path), "int8-avx2");
      EXPECT_EQ(quant_matmul_kernel(type, 64, path), "int8-gemm-avx2");
      const auto avail = quant_paths_available();
      if (std::find(avail.begin(), avail.end(), path) == avail.end()) {
        std::printf("[ skipped ] no %s path on this CPU\n", quant_path_name(path).c_str());
        continue;
      }
      ThreadPool pool(2);
      ScopedPool scoped(pool);
      constexpr int64_t N = 45, K = 512, T = 67;
      for (bool extreme : {false, true}) {
        SCOPED_TRACE(extreme ? "extreme" : "random");
        Tensor w = random_kweights(type, N, K, 71);
        std::vector<float> x = testing::random_vec(static_cast<size_t>(T * K), 72);
        if (extreme) {
          for (int64_t i = 0; i < N * K / 256; ++i) {
            if (type == DType::Q4_K) {
              auto& b = static_cast<BlockQ4_K*>(w.raw())[i];
              std::memset(b.qs, 0xFF, sizeof b.qs);
              std::memset(b.scales, 0xFF, sizeof b.scales);
            } else if (type == DType::Q5_K) {  // codes 31, scales and mins 63
              auto& b = static_cast<BlockQ5_K*>(w.raw())[i];
              std::memset(b.qs, 0xFF, sizeof b.qs);
              std::memset(b.qh, 0xFF, sizeof b.qh);
              std::memset(b.scales, 0xFF, sizeof b.scales);
            } else {  // codes 63 (q - 32 = 31), scales -128
              auto& b = static_cast<BlockQ6_K*>(w.raw())[i];
              std::memset(b.ql, 0xFF, sizeof b.ql);
              std::memset(b.qh, 0xFF, sizeof b.qh);
              std::memset(b.scales, 0x80, sizeof b.scales);
            }
          }
          for (int64_t i = 0; i < T * K; ++i) x[i] = (i / K) % 2 ? -1.0f : 1.0f;
        }
        std::vector<float> ref(T * N, 0.25f);
        quant_matmul(x.data(), 40, w, ref.data(), true, QuantPath::Scalar);
        quant_matmul(x.data() + 40 * K, T - 40, w, ref.data() + 40 * N, true, QuantPath::Scalar);
        for (const Tensor& wt : {w, repack_quant_weight(w)}) {
          SCOPED_TRACE(is_repacked(wt) ? "repacked" : "plain");
          std::vector<float> y(T * N, 0.25f);
          quant_matmul(x.data(), T, wt, y.data(), true, path);
          for (int64_t i = 0; i < T * N; ++i)
            ASSERT_EQ(std::memcmp(&y[i], &ref[i], 4), 0)
                << "token " << i / N << " row " << i % N << ": " << y[i] << " vs " << ref[i];
          // The smallest GEMM call of batched decoding, an odd token count just above the switch.
          std::vector<float> ys((from + 1) * N, 0.25f);
          quant_matmul(x.data(), from + 1, wt, ys.data(), true, path);
          for (int64_t i = 0; i < (from + 1) * N; ++i)
            ASSERT_EQ(std::memcmp(&ys[i], &ref[i], 4), 0) << "T " << from + 1 << " at " << i;
          std::vector<float> z(T * N, 3.0f);
          quant_matmul(x.data(), T, wt, z.data(), false, path);
          std::vector<float> exact(T * N);
          matmul_ref(x.data(), T, w, exact.data());
          if (!extreme) {
            EXPECT_LE(nmse(z, exact), 5e-4);
          }
        }
      }
    }
  }
}

TEST(KQuantMatmul, ActivationBlocksKeepTheirGroupSums) {
  const std::vector<float> x = testing::random_vec(2 * 512, 61, -3.0f, 3.0f);
  std::vector<quant::BlockQ8_K> q(4);
  quantize_activations_k(x.data(), 2, 512, q.data());
  for (int b = 0; b < 4; ++b) {
    float amax = 0;
    for (int j = 0; j < 256; ++j) amax = std::max(amax, std::fabs(x[b * 256 + j]));
    EXPECT_EQ(q[b].d, amax / 127.0f);
    int big = 0;
    for (int g = 0; g < 16; ++g) {
      int s = 0;
      for (int j = 0; j < 16; ++j) {
        const int v = q[b].qs[16 * g + j];
        EXPECT_LE(std::abs(v), 127);
        EXPECT_LE(std::fabs(v * q[b].d - x[b * 256 + 16 * g + j]), 0.5f * q[b].d * 1.001f);
        big = std::max(big, std::abs(v));
        s += v;
      }
      EXPECT_EQ(q[b].bsums[g], s);
    }
    EXPECT_EQ(big, 127);
  }
  EXPECT_THROW(quantize_activations_k(x.data(), 1, 300, q.data()), std::invalid_argument);
}

TEST(KQuantMatmul, ActivationQuantizersAreTheReferenceByteForByte) {
  // quantize_activations_k (and quantize_activations) run AVX2 quantizers where the CPU has AVX2: its blocks must be
  // quant::quantize_q8_k's bytes, on random values, on exact ties (max 127, so d = 1 and x * (1 / d)
  // = k + 0.5: roundf goes away from zero), on zeros, on tiny and huge scales, and on NaN and inf.
  std::vector<float> x = testing::random_vec(8 * 256, 71, -5.0f, 5.0f);
  for (int j = 0; j < 256; ++j)  // block 1: ties
    x[256 + j] = j == 0 ? 127.0f : static_cast<float>((j % 200) - 100) + (j % 2 ? 0.5f : -0.5f);
  for (int j = 0; j < 256; ++j) x[512 + j] = 0.0f;             // block 2: all zero
  for (int j = 0; j < 256; ++j) x[768 + j] *= 1e-30f;          // block 3: tiny
  for (int j = 0; j < 256; ++j) x[1024 + j] *= 1e30f;          // block 4: huge
  x[1280 + 7] = std::numeric_limits<float>::quiet_NaN();       // block 5: a NaN
  x[1536 + 9] = std::numeric_limits<float>::infinity();        // block 6: inf (d = inf)
  for (int j = 0; j < 256; ++j) x[1792 + j] = 127.0f * ((j % 5) - 2) / 2.0f;  // +-63.5, +-127
  std::vector<quant::BlockQ8_K> got(8), want(8);
  quantize_activations_k(x.data(), 2, 1024, got.data());
  quant::quantize_q8_k(x.data(), want.data(), 8 * 256);
  for (int b = 0; b < 8; ++b) {
    SCOPED_TRACE(b);
    EXPECT_EQ(std::memcmp(&got[b].d, &want[b].d, sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(got[b].qs, want[b].qs, 256), 0);
    EXPECT_EQ(std::memcmp(got[b].bsums, want[b].bsums, sizeof want[b].bsums), 0);
  }
  EXPECT_EQ(want[1].qs[101], 2);  // x = 1.5 -> 2 (away from zero)
  EXPECT_EQ(want[1].qs[1], -99);  // x = -98.5 -> -99
  // The Q8_0 / Q4_0 GEMVs' activations (32-value blocks, f16 d) on the same values.
  std::vector<quant::BlockQ8_0> got0(64), want0(64);
  quantize_activations(x.data(), 2, 1024, got0.data());
  quant::quantize_q8_0(x.data(), want0.data(), 8 * 256);
  for (int b = 0; b < 64; ++b) {
    SCOPED_TRACE(cat("q8_0 block ", b));
    EXPECT_EQ(got0[b].d, want0[b].d);
    EXPECT_EQ(std::memcmp(got0[b].qs, want0[b].qs, 32), 0);
  }
}

}  // namespace
}  // namespace parallm::kernels
