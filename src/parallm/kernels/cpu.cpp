#include "parallm/kernels/cpu.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/core/tensor.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"
#include "parallm/kernels/simd.h"

#if PARALLM_X86
#include <cpuid.h>
#endif

namespace parallm::kernels {

bool cpu_has_f16c() {
#if PARALLM_X86
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1u);
#else
  return false;
#endif
}

namespace {
// Bit `bit` of EAX in CPUID leaf 7, sub-leaf 1 (AVX-VNNI, AVX512_BF16, ...).
bool cpuid_7_1_eax(int bit) {
#if PARALLM_X86
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> bit & 1u);
#else
  (void)bit;
  return false;
#endif
}
}  // namespace

bool cpu_has_avxvnni() {
  return cpuid_7_1_eax(4);
}

bool cpu_has_avx512bf16() {
  return cpuid_7_1_eax(5);
}

namespace {

SimdLevel detect_cpu() {
#if PARALLM_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV).
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  const bool avx512 =
      avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512) return SimdLevel::Avx512;
  if (avx2) return SimdLevel::Avx2;
#endif
  return SimdLevel::Scalar;
}

// The level at start-up: what the CPU supports, capped by PARALLM_SIMD.
SimdLevel initial_level() {
  SimdLevel level = cpu_simd_level();
  const char* env = std::getenv("PARALLM_SIMD");
  if (env == nullptr || *env == '\0') return level;
  const SimdLevel cap = parse_simd_level(env, "PARALLM_SIMD");
  return std::min(level, cap);
}

std::atomic<int>& level_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_level())};
  return slot;
}

// Sums n floats; the sum keeps the loads from being optimised away. 8 independent accumulators
// keep enough loads in flight that the loop is bound by memory, not by add latency.
float sum_scalar(const float* p, size_t n) {
  float acc[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += p[i + j];
  for (; i < n; ++i) acc[0] += p[i];
  float s = 0;
  for (float a : acc) s += a;
  return s;
}

#if PARALLM_X86
inline void prefetch_line(const char* p, bool to_l2) {
  if (to_l2) {
    _mm_prefetch(p, _MM_HINT_T1);
  } else {
    _mm_prefetch(p, _MM_HINT_T0);
  }
}

// The 4 cache lines (one 64-float step of the sums below) from `at` on.
inline void prefetch_lines4(const char* at, bool to_l2) {
  for (int line = 0; line < 4; ++line) prefetch_line(at + 64 * line, to_l2);
}

// prefetch: 0, or how many bytes ahead to prefetch each cache line in software.
PARALLM_AVX2 float sum_avx2(const float* p, size_t n, size_t prefetch, bool to_l2) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (prefetch) prefetch_lines4(reinterpret_cast<const char*>(p + i) + prefetch, to_l2);
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
    a4 = _mm256_add_ps(a4, _mm256_load_ps(p + i + 32));
    a5 = _mm256_add_ps(a5, _mm256_load_ps(p + i + 40));
    a6 = _mm256_add_ps(a6, _mm256_load_ps(p + i + 48));
    a7 = _mm256_add_ps(a7, _mm256_load_ps(p + i + 56));
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  return simd::hsum8(s) + sum_scalar(p + i, n - i);
}

PARALLM_AVX512 float sum_avx512(const float* p, size_t n, size_t prefetch, bool to_l2) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (prefetch) prefetch_lines4(reinterpret_cast<const char*>(p + i) + prefetch, to_l2);
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
  }
  return simd::hsum16(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) +
         sum_scalar(p + i, n - i);
}
// Reads S streams at once, each a contiguous 1/S of [p, p + n), a cache line per stream per step:
// some memory systems deliver more with several streams in flight (the GEMV reads R rows at once).
template <int S>
PARALLM_AVX2 float sum_streams_avx2(const float* p, size_t n, size_t prefetch, bool to_l2) {
  const size_t chunk = n / S / 16 * 16;
  __m256 acc[S];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) acc[s] = _mm256_setzero_ps();
  for (size_t i = 0; i < chunk; i += 16) {
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      const float* q = p + s * chunk + i;
      if (prefetch) prefetch_line(reinterpret_cast<const char*>(q) + prefetch, to_l2);
      acc[s] = _mm256_add_ps(acc[s], _mm256_add_ps(_mm256_load_ps(q), _mm256_load_ps(q + 8)));
    }
  }
  __m256 t = _mm256_setzero_ps();
  for (int s = 0; s < S; ++s) t = _mm256_add_ps(t, acc[s]);
  return simd::hsum8(t) + sum_scalar(p + S * chunk, n - S * chunk);
}

template <int S>
PARALLM_AVX512 float sum_streams_avx512(const float* p, size_t n, size_t prefetch, bool to_l2) {
  const size_t chunk = n / S / 16 * 16;
  __m512 acc[S];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  for (size_t i = 0; i < chunk; i += 16) {
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      const float* q = p + s * chunk + i;
      if (prefetch) prefetch_line(reinterpret_cast<const char*>(q) + prefetch, to_l2);
      acc[s] = _mm512_add_ps(acc[s], _mm512_load_ps(q));
    }
  }
  __m512 t = _mm512_setzero_ps();
  for (int s = 0; s < S; ++s) t = _mm512_add_ps(t, acc[s]);
  return simd::hsum16(t) + sum_scalar(p + S * chunk, n - S * chunk);
}
#endif

// One way of reading memory: `streams` concurrent sequential streams per thread, each optionally
// prefetched in software `prefetch` bytes ahead.
struct ReadStrategy {
  int streams;
  size_t prefetch;
  bool to_l2 = false;  // prefetch into L2 only (as the GEMV does) instead of L1
};
constexpr ReadStrategy kStrategies[] = {{1, 0}, {1, 1024}, {4, 0},  {4, 512}, {4, 1024},
                                        {8, 0}, {8, 512},  {12, 0}, {16, 0}};

float sum_floats(const float* p, size_t n, ReadStrategy how) {
#if PARALLM_X86
  // The best the CPU can do, not the capped level: this is the roofline the GEMV is judged by.
  const SimdLevel level = cpu_simd_level();
  if (level >= SimdLevel::Avx2) {
    const bool z = level == SimdLevel::Avx512;
    switch (how.streams) {
      case 4:
        return z ? sum_streams_avx512<4>(p, n, how.prefetch, how.to_l2)
                 : sum_streams_avx2<4>(p, n, how.prefetch, how.to_l2);
      case 8:
        return z ? sum_streams_avx512<8>(p, n, how.prefetch, how.to_l2)
                 : sum_streams_avx2<8>(p, n, how.prefetch, how.to_l2);
      case 16:
        return z ? sum_streams_avx512<16>(p, n, how.prefetch, how.to_l2)
                 : sum_streams_avx2<16>(p, n, how.prefetch, how.to_l2);
      case 12:
        return z ? sum_streams_avx512<12>(p, n, how.prefetch, how.to_l2)
                 : sum_streams_avx2<12>(p, n, how.prefetch, how.to_l2);
      default:
        return z ? sum_avx512(p, n, how.prefetch, how.to_l2)
                 : sum_avx2(p, n, how.prefetch, how.to_l2);
    }
  }
#endif
  return sum_scalar(p, n);
}

}  // namespace

SimdLevel cpu_simd_level() {
  static const SimdLevel level = detect_cpu();
  return level;
}

SimdLevel simd_level() {
  return static_cast<SimdLevel>(level_slot().load(std::memory_order_relaxed));
}

void set_simd_level(SimdLevel l) {
  level_slot().store(static_cast<int>(std::min(l, cpu_simd_level())), std::memory_order_relaxed);
}

std::string simd_name(SimdLevel l) {
  switch (l) {
    case SimdLevel::Scalar:
      return "scalar";
    case SimdLevel::Avx2:
      return "avx2";
    case SimdLevel::Avx512:
      return "avx512";
  }
  return "unknown";
}

SimdLevel parse_simd_level(std::string_view value, std::string_view what) {
  std::string v(value);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v == "scalar") return SimdLevel::Scalar;
  if (v == "avx2") return SimdLevel::Avx2;
  if (v == "avx512") return SimdLevel::Avx512;
  fail("cpu", what, "=", value, " is not one of scalar, avx2, avx512");
}

struct BandwidthProbe::State {
  Tensor buf;
  int64_t lines = 0;
  std::vector<float> sums;
  ReadStrategy how{1, 0};
  int64_t lines_read = 0;  // what the last read summed

  // Seconds for one read of the whole buffer with `how`, all threads of the pool.
  double read_once(ReadStrategy h) {
    ThreadPool& pool = ThreadPool::current();
    std::fill(sums.begin(), sums.end(), 0.0f);
    Timer timer;
    pool.parallel_for(lines, [&](int64_t b, int64_t e) {
      sums[static_cast<size_t>(b)] =
          sum_floats(buf.data<float>() + b * 16, static_cast<size_t>(e - b) * 16, h);
    });
    const double s = timer.seconds();
    // Use the sums, so that the reads cannot be removed: they count the lines read (one 1.0 per
    // line), exact in float up to 2^24 lines per thread.
    double total = 0;
    for (float v : sums) total += v;
    lines_read = static_cast<int64_t>(total);
    return s;
  }
};

BandwidthProbe::BandwidthProbe(size_t bytes, int reps) : state_(std::make_unique<State>()) {
  if (bytes < 4096) fail("cpu", "measure_read_bandwidth: bytes must be >= 4096, got ", bytes);
  if (reps < 1) fail("cpu", "measure_read_bandwidth: reps must be >= 1, got ", reps);
  // Whole cache lines of floats, 64-byte aligned. A tensor, so that the buffer is placed in memory
  // the way the weights are (huge pages).
  const size_t n = bytes / 64 * 16;
  State& st = *state_;
  st.buf = Tensor::empty(DType::F32, {static_cast<int64_t>(n)});
  st.lines = static_cast<int64_t>(n / 16);
  st.sums.assign(static_cast<size_t>(st.lines), 0.0f);
  // Split at cache-line granularity; the static split gives each thread the same part every time,
  // so the part a thread reads was first touched (and placed on its NUMA node) by that thread.
  ThreadPool::current().parallel_for(st.lines, [&](int64_t b, int64_t e) {
    float* p = st.buf.data<float>() + b * 16;
    const size_t m = static_cast<size_t>(e - b) * 16;
    for (size_t i = 0; i < m; ++i) p[i] = i % 16 == 0 ? 1.0f : 0.0f;  // one 1.0 per line
  });
  // The best over several ways of reading (one sequential stream per thread with and without
  // software prefetch, several concurrent streams per thread): the roofline must be the most
  // this machine can read, whatever access pattern a kernel uses.
  double best = 1e300;
  for (const ReadStrategy& how : kStrategies) {
    for (int r = 0; r < reps; ++r) {
      const double s = st.read_once(how);
      // Every pattern must read each line exactly once, or its speed means nothing.
      if (st.lines <= (int64_t{1} << 24) && st.lines_read != st.lines)
        fail<std::logic_error>("cpu", "read bandwidth: the pattern of ", how.streams,
                               " streams (prefetch ", how.prefetch, ") read ", st.lines_read,
                               " cache lines of ", st.lines);
      if (s < best) {
        best = s;
        st.how = how;
      }
    }
  }
  best_ = static_cast<double>(n * sizeof(float)) / best;
}

namespace {

// kChains independent accumulators, each a[i] = a[i] * one + zero, `iters` times; returns the sum
// of the lanes, which must equal the starting sum (one and zero come from memory at run time, so
// the compiler cannot fold them).
constexpr int kChains = 12;  // FMA latency (4-5 cycles) x 2 pipes, plus slack

float fma_scalar(int64_t iters, const float* one, const float* zero) {
  float a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = 1.0f + static_cast<float>(i);
  const float m = *one, z = *zero;
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) a[i] = a[i] * m + z;
  float s = 0;
  for (float v : a) s += v;
  return s;
}

#if PARALLM_X86
PARALLM_AVX2 float fma_avx2(int64_t iters, const float* one, const float* zero) {
  __m256 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(1.0f + static_cast<float>(i));
  const __m256 m = _mm256_set1_ps(*one), z = _mm256_set1_ps(*zero);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], m, z);
  }
  float s = 0;
  for (int i = 0; i < kChains; ++i) s += simd::hsum8(a[i]) / 8.0f;
  return s;
}

PARALLM_AVX512 float fma_avx512(int64_t iters, const float* one, const float* zero) {
  __m512 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(1.0f + static_cast<float>(i));
  const __m512 m = _mm512_set1_ps(*one), z = _mm512_set1_ps(*zero);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], m, z);
  }
  float s = 0;
  for (int i = 0; i < kChains; ++i) s += simd::hsum16(a[i]) / 16.0f;
  return s;
}
#endif

}  // namespace

double measure_fma_peak(double seconds) {
  if (!(seconds > 0)) fail("cpu", "measure_fma_peak: seconds must be > 0, got ", seconds);
  static const float kOne = 1.0f;
  const volatile float* one_v = &kOne;  // read through volatile: not a compile-time constant
  const float one = *one_v, zero = 0.0f * one;
  const SimdLevel level = simd_level();
  const int lanes = level == SimdLevel::Avx512 ? 16 : level == SimdLevel::Avx2 ? 8 : 1;
  auto chains = [&](int64_t iters) -> float {
#if PARALLM_X86
    if (level == SimdLevel::Avx512) return fma_avx512(iters, &one, &zero);
    if (level == SimdLevel::Avx2) return fma_avx2(iters, &one, &zero);
#endif
    return fma_scalar(iters, &one, &zero);
  };
  // Sum of the starting values 1..kChains: what every run must give back.
  const float expect = kChains * (kChains + 1) / 2.0f;
  ThreadPool& pool = ThreadPool::current();
  const int threads = pool.size();
  // Size the run on one thread first (about a hundredth of the time), then all threads at once.
  int64_t iters = 1 << 16;
  for (;;) {
    Timer t;
    if (chains(iters) != expect) fail<std::logic_error>("cpu", "FMA peak probe: wrong sum");
    if (t.seconds() > seconds / 100 || iters > (int64_t{1} << 40)) {
      iters = std::max<int64_t>(1, static_cast<int64_t>(iters * seconds / t.seconds()));
      break;
    }
    iters *= 4;
  }
  std::vector<float> sums(static_cast<size_t>(threads), 0.0f);
  Timer timer;
  pool.parallel_for(threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sums[static_cast<size_t>(i)] = chains(iters);
  });
  const double s = timer.seconds();
  for (float v : sums)
    if (v != expect) fail<std::logic_error>("cpu", "FMA peak probe: wrong sum ", v);
  return threads * static_cast<double>(iters) * kChains * lanes * 2.0 / s;
}

BandwidthProbe::~BandwidthProbe() = default;

double BandwidthProbe::measure(int reps) {
  double best = 1e300;
  for (int r = 0; r < std::max(reps, 1); ++r) best = std::min(best, state_->read_once(state_->how));
  return static_cast<double>(state_->buf.nbytes()) / best;
}

size_t BandwidthProbe::bytes() const {
  return state_->buf.nbytes();
}

int64_t BandwidthProbe::lines_read() const {
  return state_->lines_read;
}

double measure_read_bandwidth(size_t bytes, int reps) {
  return BandwidthProbe(bytes, reps).best();
}

}  // namespace parallm::kernels
