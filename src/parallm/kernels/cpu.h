// What the CPU can do, checked at run time: SIMD paths are chosen per call from this, so one
// binary runs on any x86-64 and uses AVX2+FMA (the floor for the fast paths) or AVX-512 where
// present. PARALLM_SIMD=scalar|avx2|avx512 caps the choice (for tests and benchmarks).
#pragma once

#include <string>

namespace parallm::kernels {

enum class SimdLevel { Scalar = 0, Avx2 = 1, Avx512 = 2 };

SimdLevel simd_level();             // what the fast paths use now
void set_simd_level(SimdLevel l);   // capped at what the CPU supports
SimdLevel cpu_simd_level();         // what the CPU supports
std::string simd_name(SimdLevel l);

// Measures the machine's memory read bandwidth (bytes/s) with all threads of the current pool
// reading a buffer of `bytes` (default much larger than the caches), best of `reps`.
double measure_read_bandwidth(size_t bytes = size_t{1} << 30, int reps = 5);

}  // namespace parallm::kernels
