// Block formats: dequantization bit-exact against tests/reference/quant_ref.py (an independent
// numpy implementation of ggml's layouts) on random blocks, the reference quantizers byte-exact,
// and block tensors' bytes, slices and conversions.
#include "parallm/core/quant.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/core/tensor.h"
#include "test_util.h"

namespace parallm {
namespace {

const char* kPython = "/usr/bin/python3";

std::vector<char> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}
void write_all(const std::string& path, const void* p, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
}

// Runs quant_ref.py; false (the test skips) when python3 with numpy is not there.
bool run_ref(const std::string& mode, DType t, const std::string& in, const std::string& out) {
  if (std::system(cat(kPython, " -c 'import numpy' 2>/dev/null").c_str()) != 0) return false;
  const std::string cmd = cat(kPython, " ", PARALLM_SOURCE_DIR, "/tests/reference/quant_ref.py ",
                              mode, " ", dtype_name(t), " ", in, " ", out);
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return true;
}

// Random blocks of `t`: random bytes, with every f16 scale a finite value of either sign.
std::vector<uint8_t> random_blocks(DType t, int64_t nblocks, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> b(dtype_size(t) * nblocks);
  for (auto& v : b) v = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> scale(-2.0f, 2.0f);
  auto put_f16 = [&](size_t off) {
    const uint16_t h = f32_to_f16(scale(rng) * (rng() % 8 == 0 ? 1e-3f : 1.0f));
    std::memcpy(b.data() + off, &h, 2);
  };
  for (int64_t i = 0; i < nblocks; ++i) {
    const size_t base = i * dtype_size(t);
    switch (t) {
      case DType::Q8_0:
      case DType::Q4_0:
        put_f16(base);
        break;
      case DType::Q4_K:
      case DType::Q5_K:
        put_f16(base);
        put_f16(base + 2);
        break;
      case DType::Q6_K:
        put_f16(base + 208);
        break;
      default:
        break;
    }
  }
  return b;
}

class Dequant : public ::testing::TestWithParam<DType> {};

TEST_P(Dequant, BitExactAgainstNumpyReference) {
  const DType t = GetParam();
  const int64_t nblocks = 64;
  const int64_t n = nblocks * dtype_block(t);
  const std::vector<uint8_t> blocks = random_blocks(t, nblocks, 7 + static_cast<int>(t));
  std::vector<float> mine(n);
  quant::dequantize(t, blocks.data(), mine.data(), n);

  testing::TempDir dir;
  write_all(dir / "in", blocks.data(), blocks.size());
  if (!run_ref("dequant", t, dir / "in", dir / "out")) GTEST_SKIP() << "no python3 with numpy";
  const std::vector<char> ref = read_all(dir / "out");
  ASSERT_EQ(ref.size(), n * sizeof(float));
  int64_t diffs = 0;
  for (int64_t i = 0; i < n; ++i) {
    float r;
    std::memcpy(&r, ref.data() + i * 4, 4);
    if (std::memcmp(&r, &mine[i], 4) != 0 && ++diffs <= 5)
      ADD_FAILURE() << dtype_name(t) << " value " << i << ": " << mine[i] << " vs ref " << r;
  }
  EXPECT_EQ(diffs, 0);
  // Tensor::to dequantizes the same way.
  Tensor bt = Tensor::empty(t, {2, n / 2});
  std::memcpy(bt.raw(), blocks.data(), blocks.size());
  ASSERT_EQ(bt.nbytes(), blocks.size());
  Tensor f = bt.to(DType::F32);
  EXPECT_EQ(std::memcmp(f.raw(), mine.data(), n * 4), 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, Dequant,
                         ::testing::Values(DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q5_K,
                                           DType::Q6_K),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// Values that exercise the quantizers: gaussians, an all-zero block, blocks whose largest value is
// negative or positive, exact halves (round-half-away ties) and a block with one large outlier.
std::vector<float> quant_inputs() {
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(32 * 40);
  for (auto& v : x) v = g(rng);
  std::fill(x.begin() + 32, x.begin() + 64, 0.0f);
  for (int j = 0; j < 32; ++j) x[64 + j] = static_cast<float>(j - 16) * 0.5f;  // ties
  x[96 + 5] = -40.0f;
  x[128 + 9] = 40.0f;
  for (int j = 0; j < 32; ++j) x[160 + j] = static_cast<float>(j % 7) * 127.0f / 6.0f;
  return x;
}

class Quant : public ::testing::TestWithParam<DType> {};

TEST_P(Quant, ByteExactAgainstNumpyReferenceAndRoundTrips) {
  const DType t = GetParam();
  const std::vector<float> x = quant_inputs();
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<uint8_t> mine(dtype_bytes(t, n));
  quant::quantize(t, x.data(), mine.data(), n);

  // Round trip: within half a step (Q8_0: d/2; Q4_0: d/2, but values beyond the clamp at code 15
  // are up to one step off) of the input, per block.
  std::vector<float> back(n);
  quant::dequantize(t, mine.data(), back.data(), n);
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float step = t == DType::Q8_0 ? amax / 127 : amax / 8;
    for (int j = 0; j < 32; ++j)
      ASSERT_LE(std::fabs(back[b * 32 + j] - x[b * 32 + j]), step * 1.01f + 1e-7f)
          << "block " << b << " value " << j;
  }

  testing::TempDir dir;
  write_all(dir / "in", x.data(), x.size() * 4);
  if (!run_ref("quant", t, dir / "in", dir / "out")) GTEST_SKIP() << "no python3 with numpy";
  const std::vector<char> ref = read_all(dir / "out");
  ASSERT_EQ(ref.size(), mine.size());
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_EQ(static_cast<uint8_t>(ref[i]), mine[i])
        << dtype_name(t) << " byte " << i << " (block " << i / dtype_size(t) << ")";
}

INSTANTIATE_TEST_SUITE_P(Formats, Quant, ::testing::Values(DType::Q8_0, DType::Q4_0),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// The K quantizers, through the dequantizer checked against numpy above: every value is coded to
// the nearest point of the grid its block stores (read back from the packed scales, so a packing
// error fails here), the error is that of a 4-, 5- or 6-bit grid, and all-zero, all-negative,
// constant, outlier and uneven blocks are handled.
TEST(QuantK, QuantizersCodeEveryValueOnItsNearestGridPoint) {
  std::mt19937 rng(11);
  std::normal_distribution<float> g(0.0f, 1.0f);
  const int64_t nb = 24, n = nb * 256;
  std::vector<float> x(n);
  for (auto& v : x) v = g(rng);
  std::fill(x.begin() + 256, x.begin() + 512, 0.0f);                   // all zero
  for (int i = 512; i < 768; ++i) x[i] = -std::fabs(x[i]) - 0.5f;      // all negative
  std::fill(x.begin() + 768, x.begin() + 1024, 3.25f);                 // constant
  x[1024 + 17] = 60.0f;                                                // outliers
  x[1280 + 200] = -60.0f;
  for (int i = 1536; i < 1792; ++i) x[i] *= 1e-4f;                     // tiny scale
  for (int i = 1792; i < 2048; ++i) x[i] *= (i % 32 < 16) ? 8.0f : 0.01f;  // uneven sub-blocks

  double nmse[3] = {};  // Q4_K, Q5_K, Q6_K
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    std::vector<uint8_t> blocks(dtype_bytes(t, n));
    quant::quantize(t, x.data(), blocks.data(), n);
    std::vector<float> back(n);
    quant::dequantize(t, blocks.data(), back.data(), n);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = blocks.data() + b * dtype_size(t);
      const bool kmin = t == DType::Q4_K || t == DType::Q5_K;  // same scales, mins and grid form
      const int sub = kmin ? 32 : 16;
      for (int j = 0; j < 256 / sub; ++j) {
        // The sub-block's grid from the stored bytes.
        std::vector<float> grid;
        if (kmin) {
          // Q5_K's d, dmin and scales lie where Q4_K's do.
          const auto* q = reinterpret_cast<const quant::BlockQ4_K*>(blk);
          const int sc = j < 4 ? (q->scales[j] & 63)
                               : ((q->scales[j + 4] & 0xF) | ((q->scales[j - 4] >> 6) << 4));
          const int m = j < 4 ? (q->scales[j + 4] & 63)
                              : ((q->scales[j + 4] >> 4) | ((q->scales[j] >> 6) << 4));
          const float d1 = f16_to_f32(q->d) * static_cast<float>(sc);
          const float m1 = f16_to_f32(q->dmin) * static_cast<float>(m);
          for (int c = 0; c < (t == DType::Q4_K ? 16 : 32); ++c)
            grid.push_back(d1 * static_cast<float>(c) - m1);
        } else {
          const auto* q = reinterpret_cast<const quant::BlockQ6_K*>(blk);
          const float d = f16_to_f32(q->d);
          for (int c = -32; c < 32; ++c)
            grid.push_back(d * static_cast<float>(q->scales[j]) * static_cast<float>(c));
        }
        const float spacing = std::fabs(grid[1] - grid[0]);
        for (int l = 0; l < sub; ++l) {
          const int64_t i = b * 256 + j * sub + l;
          float nearest = 1e30f;
          for (float v : grid) nearest = std::min(nearest, std::fabs(v - x[i]));
          // A value halfway between two points may go either way in f32: a hair of slack.
          ASSERT_LE(std::fabs(back[i] - x[i]), nearest + 1e-4f * spacing + 1e-7f * std::fabs(x[i]))
              << dtype_name(t) << " block " << b << " sub-block " << j << " value " << l << ": "
              << x[i] << " -> " << back[i];
        }
      }
    }
    for (int l = 0; l < 256; ++l) ASSERT_EQ(back[256 + l], 0.0f) << dtype_name(t);
    for (int l = 0; l < 256; ++l) ASSERT_NEAR(back[768 + l], 3.25f, 0.03f) << dtype_name(t);
    // 16 gaussian blocks (0 and 8..23 less the special ones): the error of a 4-, 5- or 6-bit grid.
    // Q4_0 on the same values (32-value blocks, symmetric) has 7.4e-3: the K form must beat it.
    double err = 0, norm = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i >= 256 && i < 2048) continue;
      err += (back[i] - x[i]) * (back[i] - x[i]);
      norm += x[i] * x[i];
    }
    std::vector<uint8_t> q40(dtype_bytes(DType::Q4_0, n));
    quant::quantize(DType::Q4_0, x.data(), q40.data(), n);
    std::vector<float> back40(n);
    quant::dequantize(DType::Q4_0, q40.data(), back40.data(), n);
    double err40 = 0;
    for (int64_t i = 0; i < n; ++i)
      if (i < 256 || i >= 2048) err40 += (back40[i] - x[i]) * (back40[i] - x[i]);
    nmse[t == DType::Q4_K ? 0 : t == DType::Q5_K ? 1 : 2] = err / norm;
    if (t == DType::Q4_K) {
      EXPECT_LT(err, 0.8 * err40) << "q4_k nmse " << err / norm << ", q4_0 " << err40 / norm;
    } else if (t == DType::Q5_K) {
      // One more bit: about a quarter of Q4_K's error (checked below against it).
      EXPECT_LT(err, 0.3 * err40) << "q5_k nmse " << err / norm << ", q4_0 " << err40 / norm;
    } else {
      // A 64-level grid over +-max of 16 gaussians (max ~1.8 sigma): (1.8 / 32)^2 / 12 ~ 2.6e-4.
      EXPECT_LT(err / norm, 4e-4) << "q6_k";
    }
    // Tensor::to quantizes the same way (in 4096-value chunks).
    Tensor f = Tensor::empty(DType::F32, {4, n / 4});
    std::memcpy(f.raw(), x.data(), n * 4);
    Tensor q = f.to(t);
    ASSERT_EQ(q.nbytes(), blocks.size());
    EXPECT_EQ(std::memcmp(q.raw(), blocks.data(), blocks.size()), 0) << dtype_name(t);
  }
  EXPECT_LT(nmse[1], 0.4 * nmse[0]) << "q5_k against q4_k: " << nmse[1] << " vs " << nmse[0];
  EXPECT_LT(nmse[2], nmse[1]) << "q6_k against q5_k";
}

TEST(QuantTensor, BytesSlicesAndConversions) {
  const std::vector<float> x = quant_inputs();  // 40 blocks: [4, 320]
  Tensor f = Tensor::empty(DType::F32, {4, 320});
  std::memcpy(f.raw(), x.data(), x.size() * 4);
  Tensor q = f.to(DType::Q8_0);
  EXPECT_EQ(q.nbytes(), 40u * 34);
  EXPECT_EQ(q.describe(), "q8_0[4, 320]");
  // Rows slice at whole rows of blocks; columns only at block boundaries.
  Tensor r = q.slice_rows(1, 3);
  EXPECT_EQ(static_cast<char*>(r.raw()) - static_cast<char*>(q.raw()), 10 * 34);
  EXPECT_EQ(r.nbytes(), 20u * 34);
  Tensor c = q.slice_cols(64, 128).contiguous();
  std::vector<float> all(4 * 320), part(4 * 64);
  convert(q.raw(), DType::Q8_0, all.data(), DType::F32, all.size());
  convert(c.raw(), DType::Q8_0, part.data(), DType::F32, part.size());
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 64; ++j) ASSERT_EQ(part[i * 64 + j], all[i * 320 + 64 + j]);
  EXPECT_NE(testing::error_of([&] { q.slice_cols(16, 64); }).find("block boundaries"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] {
              Tensor::empty(DType::Q4_0, {2, 48});
            }).find("not a multiple of the 32-value block"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { q.to(DType::I32); }).find("cannot convert"), std::string::npos);
  EXPECT_NE(testing::error_of([&] {
              Tensor::zeros(DType::F32, {1, 256}).to(DType::Q6_K).to(DType::I32);
            }).find("cannot convert"),
            std::string::npos);
  EXPECT_EQ(parse_dtype("Q4_K"), DType::Q4_K);
  EXPECT_EQ(parse_dtype("q5_k"), DType::Q5_K);
  EXPECT_EQ(dtype_size(DType::Q5_K), 176u);
  // bf16 -> q4_0 quantizes the widened values.
  Tensor q4 = f.to(DType::BF16).to(DType::Q4_0);
  EXPECT_EQ(q4.nbytes(), 40u * 18);
}

}  // namespace
}  // namespace parallm
