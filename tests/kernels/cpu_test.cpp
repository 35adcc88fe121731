#include "parallm/kernels/cpu.h"

#include <gtest/gtest.h>

#include "kernel_test_util.h"
#include "parallm/core/thread_pool.h"

namespace parallm::kernels {
namespace {

TEST(Cpu, LevelIsCappedAtWhatTheCpuSupports) {
  testing::ScopedSimd restore(simd_level());
  set_simd_level(SimdLevel::Avx512);
  EXPECT_EQ(simd_level(), cpu_simd_level());
  set_simd_level(SimdLevel::Scalar);
  EXPECT_EQ(simd_level(), SimdLevel::Scalar);
  EXPECT_EQ(simd_name(SimdLevel::Avx2), "avx2");
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    EXPECT_GE(cpu_simd_level(), SimdLevel::Avx2);
  }
#endif
}

TEST(Cpu, ParsesTheSimdCap) {
  EXPECT_EQ(parse_simd_level("scalar", "PARALLM_SIMD"), SimdLevel::Scalar);
  EXPECT_EQ(parse_simd_level("AVX2", "PARALLM_SIMD"), SimdLevel::Avx2);
  EXPECT_EQ(parse_simd_level("avx512", "PARALLM_SIMD"), SimdLevel::Avx512);
  try {
    parse_simd_level("sse9", "PARALLM_SIMD");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("PARALLM_SIMD=sse9"), std::string::npos) << e.what();
  }
}

TEST(Cpu, ReadBandwidthIsPositive) {
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  const double bw = measure_read_bandwidth(size_t{8} << 20, 2);
  EXPECT_GT(bw, 1e8);   // any machine reads more than 100 MB/s
  EXPECT_LT(bw, 1e14);  // and less than 100 TB/s
  EXPECT_THROW(measure_read_bandwidth(100, 1), std::invalid_argument);
  EXPECT_THROW(measure_read_bandwidth(1 << 20, 0), std::invalid_argument);
}

TEST(Cpu, BandwidthProbeRepeatsTheMeasurement) {
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  BandwidthProbe probe(size_t{8} << 20, 2);
  EXPECT_GT(probe.best(), 1e8);
  for (int i = 0; i < 3; ++i) {
    const double now = probe.measure(1);
    EXPECT_GT(now, 1e8);
    EXPECT_LT(now, 1e14);
  }
  EXPECT_THROW(BandwidthProbe(100, 1), std::invalid_argument);
}

}  // namespace
}  // namespace parallm::kernels
