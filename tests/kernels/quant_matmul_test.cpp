// Quantized GEMV/GEMM: every path this CPU runs against the f32 product on the dequantized weights
// (normalised mean squared error <= 5e-4, the bound of issue 15) and against the plain integer
// reference; kernels::matmul's dispatch of block dtypes.
#include "parallm/kernels/quant_matmul.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "kernel_test_util.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/matmul.h"

namespace parallm::kernels {
namespace {

// sum (a - b)^2 / sum b^2
double nmse(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return num / den;
}

Tensor quantized(DType t, int64_t N, int64_t K, uint32_t seed) {
  const std::vector<float> w = testing::random_vec(static_cast<size_t>(N * K), seed);
  Tensor f = Tensor::empty(DType::F32, {N, K});
  std::memcpy(f.raw(), w.data(), w.size() * 4);
  return f.to(t);
}

// Random K-format blocks with small finite scales (the kernels do not care how they were made).
Tensor random_kblocks(DType t, int64_t N, int64_t K, uint32_t seed) {
  Tensor w = Tensor::empty(t, {N, K});
  std::mt19937 rng(seed);
  uint8_t* p = static_cast<uint8_t*>(w.raw());
  for (size_t i = 0; i < w.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng());
  const int64_t nb = N * K / 256;
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = p + b * dtype_size(t);
    const uint16_t d = f32_to_f16(0.01f), dmin = f32_to_f16(0.02f);
    if (t == DType::Q4_K || t == DType::Q5_K) {
      std::memcpy(blk, &d, 2);
      std::memcpy(blk + 2, &dmin, 2);
    } else {
      std::memcpy(blk + 208, &d, 2);
    }
  }
  return w;
}

struct Case {
  DType type;
  int64_t N, K, T;
};

class QuantMatmul : public ::testing::TestWithParam<Case> {};

TEST_P(QuantMatmul, EveryPathWithinNmseOfDequantizedF32AndNearTheReference) {
  const Case c = GetParam();
  const Tensor w = quantized(c.type, c.N, c.K, 11);
  const std::vector<float> x = testing::random_vec(static_cast<size_t>(c.T * c.K), 12);
  std::vector<float> ref(static_cast<size_t>(c.T * c.N));
  matmul_ref(x.data(), c.T, w, ref.data());
  std::vector<float> plain(ref.size());
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  quant_matmul(x.data(), c.T, w, plain.data(), false, QuantPath::Scalar);
  EXPECT_LE(nmse(plain, ref), 5e-4);
  for (QuantPath p : quant_paths_available()) {
    SCOPED_TRACE(quant_path_name(p));
    std::vector<float> y(ref.size(), 1.0f);
    quant_matmul(x.data(), c.T, w, y.data(), false, p);
    const double e = nmse(y, ref);
    EXPECT_LE(e, 5e-4);
    // The same integer sums in another order of f32 adds: close to the plain reference.
    EXPECT_LE(testing::normalised_error(y, plain), 1e-5);
    // accumulate adds to what is there
    std::vector<float> acc(ref.size(), 1.0f);
    quant_matmul(x.data(), c.T, w, acc.data(), true, p);
    for (size_t i = 0; i < acc.size(); ++i) ASSERT_NEAR(acc[i], y[i] + 1.0f, 1e-4f) << i;
    if (c.N == 67 && c.T == 1)
      std::printf("[ quant ] %s %s NMSE %.2e\n", std::string(dtype_name(c.type)).c_str(),
                  quant_path_name(p).c_str(), e);
  }
  // kernels::matmul sends block dtypes here.
  std::vector<float> via(ref.size());
  matmul(x.data(), c.T, w, via.data());
  EXPECT_LE(testing::normalised_error(via, plain), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, QuantMatmul,
    ::testing::Values(Case{DType::Q8_0, 67, 256, 1}, Case{DType::Q8_0, 8, 96, 5},
                      Case{DType::Q8_0, 130, 512, 3}, Case{DType::Q4_0, 67, 256, 1},
                      Case{DType::Q4_0, 9, 64, 7}, Case{DType::Q4_0, 130, 512, 2}),
    [](const auto& info) {
      const Case& c = info.param;
      return cat(dtype_name(c.type), "_N", c.N, "_K", c.K, "_T", c.T);
    });

TEST(QuantMatmul, PrefillGoesThroughDequantizedSgemm) {
  // From 64 tokens: f32 activations against the dequantized weights, so close to the reference
  // (no activation quantization), with and without accumulate, every block dtype (Q8_0 and Q4_0
  // on the AVX-512 VNNI path run the int8 GEMM instead: the next test).
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    if (quant_matmul_kernel(t, 70, quant_path()) != "sgemm") continue;
    const Tensor w = t == DType::Q8_0 || t == DType::Q4_0 ? quantized(t, 45, 256, 8)
                                                          : random_kblocks(t, 45, 256, 8);
    const std::vector<float> x = testing::random_vec(70 * 256, 9);
    std::vector<float> ref(70 * 45), y(70 * 45, 2.0f);
    matmul_ref(x.data(), 70, w, ref.data());
    quant_matmul(x.data(), 70, w, y.data(), true);
    for (float& v : y) v -= 2.0f;
    EXPECT_LE(testing::normalised_error(y, ref), 1e-5);
  }
}

TEST(QuantMatmul, PrefillInt8GemmIsThePlainReferenceBitForBit) {
  // Q8_0 and Q4_0 run an int8 GEMM on packed 32-row panels: on the AVX-512 VNNI path (vpdpbusd)
  // from 16 tokens, on the AVX2 and AVX-VNNI paths (vpmaddubsw, tiles of 16 rows) from 16 (Q4_0)
  // and 64 (Q8_0). Both
  // form the plain reference's integer block sums and scale and add them in its order, so every
  // output equals the scalar GEMV's bit for bit. N = 77: two whole panels and a tail of 13 rows
  // (on AVX2 a partial 16-row half); T = 70 and the switch + 4: every token tile and
  // tail; plain and repacked weights; accumulate; and Q8_0 codes of -128 against activations of
  // +-127 (no int16 saturation).
  struct Gemm {
    QuantPath path;
    const char* name;
    int64_t from_q8, from_q4;
    int64_t from(DType t) const { return t == DType::Q8_0 ? from_q8 : from_q4; }
  };
  int ran = 0;
  for (const Gemm& g : {Gemm{QuantPath::Avx512Vnni, "int8-gemm-avx512-vnni", 16, 16},
                        Gemm{QuantPath::AvxVnni, "int8-gemm-avx2", 64, 16},
                        Gemm{QuantPath::Avx2, "int8-gemm-avx2", 64, 16}}) {
    SCOPED_TRACE(quant_path_name(g.path));
    for (DType t : {DType::Q8_0, DType::Q4_0}) {
      EXPECT_EQ(quant_matmul_kernel(t, 70, g.path), g.name);
      EXPECT_EQ(quant_matmul_kernel(t, g.from(t), g.path), g.name);
      EXPECT_EQ(quant_matmul_kernel(t, g.from(t) - 1, g.path), "int8-" + quant_path_name(g.path));
      EXPECT_EQ(quant_matmul_kernel(t, 70, QuantPath::Scalar), "sgemm");
    }
    const auto avail = quant_paths_available();
    if (std::find(avail.begin(), avail.end(), g.path) == avail.end()) {
      std::printf("[ skipped ] this CPU has no %s path\n", quant_path_name(g.path).c_str());
      continue;
    }
    ++ran;
    ThreadPool pool(2);
    ScopedPool scoped(pool);
    constexpr int64_t N = 77, K = 256, T = 70;
    for (DType t : {DType::Q8_0, DType::Q4_0}) {
      SCOPED_TRACE(std::string(dtype_name(t)));
      Tensor w = quantized(t, N, K, 21);
      if (t == DType::Q8_0) {  // one row of extreme codes
        auto* b = static_cast<quant::BlockQ8_0*>(w.raw()) + 5 * (K / 32);
        for (int i = 0; i < K / 32; ++i)
          for (int j = 0; j < 32; ++j) b[i].qs[j] = static_cast<int8_t>(j % 2 ? -128 : 127);
      }
      std::vector<float> x = testing::random_vec(static_cast<size_t>(T * K), 22);
      for (int64_t k = 0; k < K; ++k) x[3 * K + k] = k % 2 ? -1.0f : 1.0f;  // codes +-127
      // The reference: the scalar GEMV, in chunks below 64 tokens.
      std::vector<float> ref(T * N, 0.5f);
      quant_matmul(x.data(), 40, w, ref.data(), true, QuantPath::Scalar);
      quant_matmul(x.data() + 40 * K, T - 40, w, ref.data() + 40 * N, true, QuantPath::Scalar);
      std::vector<float> dq(T * N);
      matmul_ref(x.data(), T, w, dq.data());
      for (const Tensor& wt : {w, repack_quant_weight(w)}) {
        SCOPED_TRACE(is_repacked(wt) ? "repacked" : "plain");
        std::vector<float> y(T * N, 0.5f);
        quant_matmul(x.data(), T, wt, y.data(), true, g.path);
        for (int64_t i = 0; i < T * N; ++i)
          ASSERT_EQ(std::memcmp(&y[i], &ref[i], 4), 0)
              << "token " << i / N << " row " << i % N << ": " << y[i] << " vs " << ref[i];
        std::vector<float> z(T * N, 7.0f);
        quant_matmul(x.data(), T, wt, z.data(), false, g.path);
        for (float& v : y) v -= 0.5f;
        EXPECT_LE(testing::normalised_error(z, y), 1e-6);
        EXPECT_LE(nmse(z, dq), 5e-4);
        // 4 tokens past the switch (batched decoding; on AVX2, Q4_0's tiles of 3 tokens and one
        // of 2): the same bits.
        const int64_t n = g.from(t) + 4;
        std::vector<float> s(static_cast<size_t>(n * N), 0.5f);
        quant_matmul(x.data(), n, wt, s.data(), true, g.path);
        EXPECT_EQ(std::memcmp(s.data(), ref.data(), s.size() * 4), 0) << n << " tokens";
      }
    }
  }
  if (ran == 0) std::printf("[ skipped ] no int8 GEMM path on this CPU\n");
}

TEST(QuantMatmul, KFormatPrefillOnAvx512Bf16RoundsXAndTheDequantizedWeights) {
  // From 64 tokens on an AVX512_BF16 CPU, Q4_K, Q5_K and Q6_K run the bf16 GEMM (kernels/matmul.h):
  // rows dequantized to f32, then x and those rows rounded to bf16, products summed in f32.
  if (quant_matmul_kernel(DType::Q4_K, 70, quant_path()) != "bf16-gemm-avx512") {
    std::printf("[ skipped ] no AVX512_BF16 here: K-format prefill runs sgemm\n");
    return;
  }
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  constexpr int64_t T = 70, N = 45, K = 512;
  auto round = [](std::vector<float> v) {
    for (float& f : v) f = bf16_to_f32(f32_to_bf16(f));
    return v;
  };
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    const Tensor w = random_kblocks(t, N, K, 41);
    const Tensor wf = w.to(DType::F32);
    const std::vector<float> wr =
        round(std::vector<float>(wf.data<float>(), wf.data<float>() + N * K));
    Tensor wrt = Tensor::empty(DType::F32, {N, K});
    std::memcpy(wrt.raw(), wr.data(), wr.size() * 4);
    const std::vector<float> x = testing::random_vec(static_cast<size_t>(T * K), 42);
    const std::vector<float> xr = round(x);
    std::vector<float> y(T * N, 1.5f), ref(T * N, 1.5f), exact(T * N);
    quant_matmul(x.data(), T, w, y.data(), true);
    matmul_ref(xr.data(), T, wrt, ref.data(), true);
    EXPECT_LE(testing::normalised_error(y, ref), 1e-5);
    for (float& v : y) v -= 1.5f;
    matmul_ref(x.data(), T, w, exact.data());
    EXPECT_LE(nmse(y, exact), 5e-4);
  }
}

TEST(QuantMatmul, KFormatsMatchTheDequantizedProduct) {
  // Integer kernels with 8-bit activations below 64 tokens (kquant_matmul_test.cpp checks them in
  // detail): within the NMSE bound of the f32 product.
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    const Tensor w = random_kblocks(t, 13, 512, 5);
    const std::vector<float> x = testing::random_vec(3 * 512, 6);
    std::vector<float> ref(3 * 13), y(3 * 13);
    matmul_ref(x.data(), 3, w, ref.data());
    matmul(x.data(), 3, w, y.data());
    EXPECT_LE(nmse(y, ref), 5e-4);
  }
}

TEST(QuantMatmul, ExtremeCodesDoNotSaturate) {
  // Q8_0 codes of -128 (possible in a file) against activations of +-127: maddubs's i16 pair sums
  // reach 2 * 128 * 127, still below 32767.
  Tensor w = Tensor::empty(DType::Q8_0, {4, 64});
  auto* b = static_cast<quant::BlockQ8_0*>(w.raw());
  for (int i = 0; i < 8; ++i) {
    b[i].d = f32_to_f16(1.0f);
    for (int j = 0; j < 32; ++j) b[i].qs[j] = static_cast<int8_t>(j % 2 ? -128 : 127);
  }
  std::vector<float> x(64);
  for (int j = 0; j < 64; ++j) x[j] = j % 2 ? -1.0f : 1.0f;  // quantizes to +-127, d = 1/127
  std::vector<float> ref(4);
  quant_matmul(x.data(), 1, w, ref.data(), false, QuantPath::Scalar);
  EXPECT_NEAR(ref[0], 64 * 127.5f * 127 / 127.0f, 1.0f);
  for (QuantPath p : quant_paths_available()) {
    std::vector<float> y(4);
    quant_matmul(x.data(), 1, w, y.data(), false, p);
    for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(y[i], ref[i]) << quant_path_name(p);
  }
}

TEST(QuantMatmul, ErrorsNameTheProblem) {
  Tensor f = Tensor::zeros(DType::F32, {2, 32});
  std::vector<float> x(32), y(2);
  EXPECT_THROW(quant_matmul(x.data(), 1, f, y.data(), false, QuantPath::Scalar),
               std::invalid_argument);
  std::vector<quant::BlockQ8_0> out(1);
  EXPECT_THROW(quantize_activations(x.data(), 1, 31, out.data()), std::invalid_argument);
}


// Random Q4_0 / Q8_0 blocks: every code (Q8_0's -128 included) with small finite scales.
Tensor random_blocks(DType t, int64_t N, int64_t K, uint32_t seed) {
  Tensor w = Tensor::empty(t, {N, K});
  std::mt19937 rng(seed);
  uint8_t* p = static_cast<uint8_t*>(w.raw());
  for (size_t i = 0; i < w.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> sd(-0.05f, 0.05f);
  for (int64_t b = 0; b < N * K / 32; ++b) {
    const uint16_t d = f32_to_f16(sd(rng));
    std::memcpy(p + b * dtype_size(t), &d, 2);
  }
  return w;
}

// Q4_K / Q5_K blocks whose d and dmin differ from block to block (and so from row to row: a
// kernel that gave one row another's scales would fail), every code and 6-bit scale random.
Tensor random_kblocks_varied(DType t, int64_t N, int64_t K, uint32_t seed) {
  Tensor w = random_kblocks(t, N, K, seed);
  std::mt19937 rng(seed + 1);
  std::uniform_real_distribution<float> sd(0.001f, 0.05f);
  auto* p = static_cast<uint8_t*>(w.raw());
  for (int64_t i = 0; i < N * K / 256; ++i) {  // d, dmin: the block's first 4 bytes in both
    const uint16_t d = f32_to_f16(sd(rng)), dmin = f32_to_f16(sd(rng));
    std::memcpy(p + i * dtype_size(t), &d, 2);
    std::memcpy(p + i * dtype_size(t) + 2, &dmin, 2);
  }
  return w;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

TEST(QuantRepack, BitIdenticalToThePlainLayoutOnEveryPath) {
  // Every path, T = 1..8 (the 2-token tiles and the single-token rest), N with and without tail
  // rows, K from one block to 4096; accumulate too; prefill (sgemm, or the AVX-512 VNNI GEMM, on
  // unpacked rows) and the dequantized baseline.
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  struct Sizes {
    DType type;
    std::vector<int64_t> K;
  };
  for (const Sizes& sz :
       {Sizes{DType::Q4_0, {32, 96, 512, 4096}}, Sizes{DType::Q8_0, {32, 96, 512, 4096}},
        Sizes{DType::Q4_K, {256, 768, 2048}}, Sizes{DType::Q5_K, {256, 768, 2048}},
        Sizes{DType::Q6_K, {256, 768, 2048}}})
    for (int64_t K : sz.K)
      for (int64_t N : {4, 5, 7, 13, 36}) {
        const DType type = sz.type;
        SCOPED_TRACE(cat(dtype_name(type), " N ", N, " K ", K));
        const uint32_t seed = static_cast<uint32_t>(N * 7919 + K);
        const Tensor w = type == DType::Q4_K || type == DType::Q5_K
                             ? random_kblocks_varied(type, N, K, seed)
                         : type == DType::Q6_K ? random_kblocks(DType::Q6_K, N, K, seed)
                                               : random_blocks(type, N, K, seed);
        const Tensor wp = repack_quant_weight(w);
        ASSERT_TRUE(is_repacked(wp));
        ASSERT_FALSE(is_repacked(w));
        ASSERT_NE(wp.raw(), w.raw());
        EXPECT_EQ(wp.nbytes(), w.nbytes());
        // The tail rows keep their bytes and their place.
        const size_t tail = static_cast<size_t>(N / 4 * 4) * dtype_bytes(type, K);
        EXPECT_EQ(std::memcmp(static_cast<const char*>(w.raw()) + tail,
                              static_cast<const char*>(wp.raw()) + tail, w.nbytes() - tail),
                  0);
        for (int64_t T : {1, 2, 3, 4, 5, 6, 7, 8, 70}) {
          const std::vector<float> x =
              testing::random_vec(static_cast<size_t>(T * K), static_cast<uint32_t>(T + K));
          for (QuantPath p : quant_paths_available()) {
            SCOPED_TRACE(cat(quant_path_name(p), " T ", T));
            std::vector<float> a(static_cast<size_t>(T * N)), b(a.size(), 3.0f);
            quant_matmul(x.data(), T, w, a.data(), false, p);
            quant_matmul(x.data(), T, wp, b.data(), false, p);
            // The K formats: every SIMD path runs the AVX2 kernels, plain and repacked alike.
            const bool exact = p == QuantPath::Scalar || p == QuantPath::Avx2 || T >= 64 ||
                               dtype_block(type) == 256;
            if (exact) {
              EXPECT_TRUE(same_bits(a, b));
            } else {  // the VNNI paths run the repacked AVX2 kernel: the same sums, maybe reordered
              EXPECT_LE(testing::normalised_error(b, a), 1e-5);
            }
            std::vector<float> aa(a.size(), 0.5f), ba(a.size(), 0.5f);
            quant_matmul(x.data(), T, w, aa.data(), true, p);
            quant_matmul(x.data(), T, wp, ba.data(), true, p);
            if (exact) {
              EXPECT_TRUE(same_bits(aa, ba));
            }
          }
          if (T == 3) {
            std::vector<float> a(static_cast<size_t>(T * N)), b(a.size());
            quant_matmul_dequant(x.data(), T, w, a.data());
            quant_matmul_dequant(x.data(), T, wp, b.data());
            EXPECT_TRUE(same_bits(a, b));
          }
        }
      }
}

TEST(QuantRepack, ViewsOtherDtypesAndLifetime) {
  const Tensor w = random_blocks(DType::Q4_0, 12, 64, 1);
  const std::vector<float> x = testing::random_vec(64, 2);
  std::vector<float> y(12);
  {
    const Tensor wp = repack_quant_weight(w);
    EXPECT_EQ(repack_quant_weight(wp).raw(), wp.raw());  // repacked already: itself
    // A view would read the groups as plain rows: refused, whichever its start.
    EXPECT_THROW(quant_matmul(x.data(), 1, wp.slice_rows(4, 8), y.data()), std::invalid_argument);
    EXPECT_THROW(quant_matmul(x.data(), 1, wp.slice_rows(0, 8), y.data()), std::invalid_argument);
    const Tensor copy = wp;  // copies share the storage and stay repacked
    EXPECT_TRUE(is_repacked(copy));
  }
  // Not Q4_0 / Q8_0 / Q4_K / Q5_K / Q6_K, or fewer than 4 rows: the tensor itself.
  const Tensor k = random_kblocks(DType::Q6_K, 3, 256, 3);
  EXPECT_EQ(repack_quant_weight(k).raw(), k.raw());
  const Tensor small = random_blocks(DType::Q8_0, 3, 64, 4);
  EXPECT_EQ(repack_quant_weight(small).raw(), small.raw());
  EXPECT_FALSE(is_repacked(small));
  const Tensor f = Tensor::zeros(DType::F32, {4, 32});
  EXPECT_EQ(repack_quant_weight(f).raw(), f.raw());
  EXPECT_FALSE(is_repacked(f));
}

}  // namespace
}  // namespace parallm::kernels
