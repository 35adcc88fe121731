// What the CPU can do, checked at run time: SIMD paths are chosen per call from this, so one
// binary runs on any x86-64 and uses AVX2+FMA (the floor for the fast paths) or AVX-512 where
// present. PARALLM_SIMD=scalar|avx2|avx512 caps the choice (for tests and benchmarks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace parallm::kernels {

enum class SimdLevel { Scalar = 0, Avx2 = 1, Avx512 = 2 };

SimdLevel simd_level();            // what the fast paths use now
void set_simd_level(SimdLevel l);  // capped at what the CPU supports
SimdLevel cpu_simd_level();        // what the CPU supports
// CPUID feature bits that not every compiler's __builtin_cpu_supports knows (clang 14 has neither
// "f16c" nor "avxvnni"): F16C (leaf 1, ECX bit 29), AVX-VNNI (leaf 7 sub-leaf 1, EAX bit 4) and
// AVX512_BF16 (leaf 7 sub-leaf 1, EAX bit 5). Whether the OS saves the AVX registers is
// cpu_simd_level()'s check, not these.
bool cpu_has_f16c();
bool cpu_has_avxvnni();
bool cpu_has_avx512bf16();
std::string simd_name(SimdLevel l);
// "scalar", "avx2" or "avx512" (any case); otherwise std::invalid_argument naming `what` and the
// value, e.g. "[cpu] PARALLM_SIMD=sse9 is not one of scalar, avx2, avx512".
SimdLevel parse_simd_level(std::string_view value, std::string_view what);

// Measures the machine's memory read bandwidth (bytes/s) with all threads of the current pool
// reading disjoint parts of a buffer of `bytes` (default much larger than the caches; first
// touched by the same threads), best of `reps` for each of several read patterns (1..16 streams
// per thread, with and without software prefetch): the most this machine reads, the roofline
// for the decode benchmark. Takes ~2 s at the default size.
double measure_read_bandwidth(size_t bytes = size_t{1} << 30, int reps = 5);

// The machine's multiply-add peak (FLOP/s, all threads of the current pool together): each thread
// runs independent fused multiply-add chains (enough of them to hide the latency) at the SIMD level
// in use for `seconds`; an FMA counts 2 FLOPs per lane. The compute roofline of batched decode and
// prefill: a product can't run faster than this. The chains multiply by 1 and add 0, so their
// values stay what they were; the probe checks that, so the loop cannot be optimised away unseen.
double measure_fma_peak(double seconds = 0.2);

// The same measurement, kept ready to repeat: the constructor finds the best read pattern (as
// measure_read_bandwidth does); measure() then re-reads the buffer with that pattern only, quickly
// enough (~10 ms per 256 MiB) to run between decode steps. The bandwidth of a shared machine
// drifts from second to second, so a ratio against it must be measured beside each step.
class BandwidthProbe {
 public:
  BandwidthProbe(size_t bytes, int reps);
  ~BandwidthProbe();
  BandwidthProbe(const BandwidthProbe&) = delete;
  BandwidthProbe& operator=(const BandwidthProbe&) = delete;
  double best() const { return best_; }  // bytes/s from the constructor's search
  double measure(int reps = 2);          // bytes/s now, best of `reps` with the chosen pattern
  // The bytes one read covers: what was asked, in whole 64-byte cache lines.
  size_t bytes() const;
  // The cache lines the last read actually summed: each line holds one 1.0 among zeros, so this
  // is the sum of what was read. The constructor checks it against bytes() / 64 for every read
  // pattern (buffers up to 1 GiB, where the float sums are exact).
  int64_t lines_read() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
  double best_ = 0;
};

}  // namespace parallm::kernels
