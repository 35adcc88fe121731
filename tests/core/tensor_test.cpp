#include "parallm/core/tensor.h"

#include <gtest/gtest.h>

#include <cmath>

#include "parallm/core/dtype.h"
#include "parallm/core/thread_pool.h"

namespace parallm {
namespace {

TEST(DType, Bf16RoundTripsAndRoundsToNearestEven) {
  for (float v : {0.0f, 1.0f, -2.5f, 3.140625f, std::ldexp(1.0f, -100), 65280.0f}) {
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(v)), v) << v;
  }
  // 1 + 2^-8 lies exactly halfway between two bf16 values: ties go to the even one (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, F16RoundTripsNormalsSubnormalsAndSpecials) {
  for (float v :
       {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f, 0.333251953125f}) {
    EXPECT_EQ(f16_to_f32(f32_to_f16(v)), v) << v;
  }
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
  // Every f16 bit pattern that is not NaN survives f16 -> f32 -> f16.
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(f32_to_f16(f), h) << h;
  }
}

TEST(DType, ParseNamesTheBadValue) {
  EXPECT_EQ(parse_dtype("BF16"), DType::BF16);
  EXPECT_EQ(parse_dtype("float32"), DType::F32);
  try {
    parse_dtype("int3", "--dtype");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("--dtype"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("int3"), std::string::npos);
  }
}

TEST(Tensor, ViewsShareStorageAndCopiesConvert) {
  Tensor t = Tensor::empty(DType::F32, {3, 4});
  for (int i = 0; i < 12; ++i) t.data<float>()[i] = static_cast<float>(i);
  Tensor rows = t.slice_rows(1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 4}));
  EXPECT_EQ(rows.data<float>()[0], 4.0f);
  Tensor cols = t.slice_cols(1, 3);
  EXPECT_FALSE(cols.is_contiguous());
  Tensor c = cols.to(DType::BF16);
  EXPECT_EQ(c.shape(), (Shape{3, 2}));
  EXPECT_EQ(bf16_to_f32(c.data<uint16_t>()[0]), 1.0f);
  EXPECT_EQ(bf16_to_f32(c.data<uint16_t>()[5]), 10.0f);
  EXPECT_EQ(t.reshape({-1}).shape(), (Shape{12}));
  EXPECT_THROW(t.reshape({5}), std::invalid_argument);
  EXPECT_THROW(t.slice_rows(2, 4), std::invalid_argument);
}

TEST(Tensor, LargeTensorsAreHugePageAligned) {
  // Weights stream once per decode step; 2 MiB alignment lets them sit on transparent huge pages.
  Tensor big = Tensor::zeros(DType::BF16, {1024, 2048});  // 4 MiB
  EXPECT_EQ(reinterpret_cast<uintptr_t>(big.raw()) % (size_t{2} << 20), 0u);
  EXPECT_EQ(big.data<uint16_t>()[1024 * 2048 - 1], 0);
  Tensor small = Tensor::zeros(DType::F32, {3});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small.raw()) % 64, 0u);
}

TEST(ThreadPool, CoversEveryIndexOnceStaticAndDynamic) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 7, 1000}) {
      std::vector<int> hits(n, 0);
      pool.parallel_for(n, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i]++;
      });
      pool.parallel_for_dynamic(n, 3, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i]++;
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i], 2) << threads << " " << n << " " << i;
    }
  }
}

}  // namespace
}  // namespace parallm
