#include "parallm/kernels/cpu.h"

#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>

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

TEST(Cpu, CpuidBitsAgreeWithTheKernelsFlags) {
  // Linux lists what CPUID reports in /proc/cpuinfo's flags: our own reads of the bits must agree.
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line) && line.rfind("flags", 0) != 0) {
  }
  if (line.empty()) {
    std::printf("[ skipped ] no flags line in /proc/cpuinfo\n");
    return;
  }
  std::set<std::string> flags;
  std::istringstream words(line.substr(line.find(':') + 1));
  for (std::string w; words >> w;) flags.insert(w);
  EXPECT_EQ(cpu_has_f16c(), flags.count("f16c") == 1);
  EXPECT_EQ(cpu_has_avxvnni(), flags.count("avx_vnni") == 1);
  EXPECT_EQ(cpu_has_avx512bf16(), flags.count("avx512_bf16") == 1);
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

TEST(Cpu, ReadBandwidthRejectsBadArguments) {
  ThreadPool pool(2);
  ScopedPool scoped(pool);
  EXPECT_THROW(measure_read_bandwidth(100, 1), std::invalid_argument);
  EXPECT_THROW(measure_read_bandwidth(1 << 20, 0), std::invalid_argument);
  EXPECT_THROW(BandwidthProbe(100, 1), std::invalid_argument);
}

// A bandwidth is bytes over seconds: the bytes must be the ones asked for, each read once, by every
// read pattern the probe tries (the constructor checks each) and by the one it keeps.
TEST(Cpu, BandwidthProbeReadsEveryLineOnce) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    ScopedPool scoped(pool);
    // 8 MiB and 3 lines and a part: no multiple of the 4..16 streams a pattern splits into.
    const size_t asked = (size_t{8} << 20) + 3 * 64 + 40;
    BandwidthProbe probe(asked, 1);
    EXPECT_EQ(probe.bytes(), asked / 64 * 64);
    EXPECT_EQ(probe.lines_read(), static_cast<int64_t>(asked / 64)) << threads << " threads";
    for (int i = 0; i < 2; ++i) {
      EXPECT_GT(probe.measure(1), 0.0);
      EXPECT_EQ(probe.lines_read(), static_cast<int64_t>(asked / 64)) << threads << " threads";
    }
  }
}

// The FMA probe checks its own chains' sums (a wrong or optimised-away loop throws); here every SIMD
// level the CPU has gives a finite positive rate, and a non-positive duration is refused.
TEST(Cpu, FmaPeakRunsAtEveryLevel) {
  testing::ScopedSimd restore(simd_level());
  for (int threads : {1, 2}) {
    ThreadPool pool(threads);
    ScopedPool scoped(pool);
    for (SimdLevel l : {SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512}) {
      if (l > cpu_simd_level()) continue;
      set_simd_level(l);
      const double flops = measure_fma_peak(0.01);
      EXPECT_GT(flops, 1e6) << simd_name(l) << ", " << threads << " threads";
      EXPECT_LT(flops, 1e15) << simd_name(l) << ", " << threads << " threads";
    }
  }
  EXPECT_THROW(measure_fma_peak(0), std::invalid_argument);
  EXPECT_THROW(measure_fma_peak(-1), std::invalid_argument);
}

}  // namespace
}  // namespace parallm::kernels
