#include "parallm/comm/algorithms/reduce.h"

#include <algorithm>

#include "parallm/core/error.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/simd.h"

namespace parallm::comm::algorithms {

namespace {

// acc = acc (op) in, in blocks of a constant 16: GCC's -O2 vectoriser (the "very cheap" cost
// model) leaves a loop of unknown length scalar, and the scalar loop made our ring all-reduce over
// MPI 1.4x slower than Open MPI's own ring. Compiled twice below: plain (SSE2) and AVX2.
__attribute__((always_inline)) inline void reduce_blocks(float* __restrict acc,
                                                         const float* __restrict in, size_t n,
                                                         ReduceOp op) {
  constexpr size_t kB = 16;
  size_t i = 0;
  if (op == ReduceOp::Sum) {
    for (; i + kB <= n; i += kB)
      for (size_t j = 0; j < kB; ++j) acc[i + j] += in[i + j];
    for (; i < n; ++i) acc[i] += in[i];
  } else {
    for (; i + kB <= n; i += kB)
      for (size_t j = 0; j < kB; ++j) acc[i + j] = std::max(acc[i + j], in[i + j]);
    for (; i < n; ++i) acc[i] = std::max(acc[i], in[i]);
  }
}

void reduce_plain(float* __restrict acc, const float* __restrict in, size_t n, ReduceOp op) {
  reduce_blocks(acc, in, n, op);
}

#if PARALLM_X86
PARALLM_AVX2 void reduce_avx2(float* __restrict acc, const float* __restrict in, size_t n,
                              ReduceOp op) {
  reduce_blocks(acc, in, n, op);
}
#endif

}  // namespace

void reduce_f32(float* __restrict acc, const float* __restrict in, size_t n, ReduceOp op) {
  // The AVX2 version where the kernels' CPU-feature query allows it (the CPU has it, and
  // PARALLM_SIMD does not cap it): it took the ring from 1.1-1.2x to 0.9-1.0x of MPI_Allreduce
  // (docs/benchmarks.md).
#if PARALLM_X86
  if (kernels::simd_level() >= kernels::SimdLevel::Avx2) return reduce_avx2(acc, in, n, op);
#endif
  reduce_plain(acc, in, n, op);
}

namespace {

// One cache line (or the tail) of out = in[0] (op) ... (op) in[p-1]; M is the element count, a
// constant for whole lines so that the loops vectorise.
template <size_t M>
inline void combine_line(float* __restrict o, const float* const* in, int p, size_t i, size_t m,
                         ReduceOp op) {
  const size_t len = M ? M : m;
  const float* __restrict a = in[0] + i;
  if (p == 1) {
    for (size_t j = 0; j < len; ++j) o[j] = a[j];
    return;
  }
  const float* __restrict b = in[1] + i;
  if (op == ReduceOp::Sum) {
    for (size_t j = 0; j < len; ++j) o[j] = a[j] + b[j];
    for (int q = 2; q < p; ++q) {
      const float* __restrict c = in[q] + i;
      for (size_t j = 0; j < len; ++j) o[j] += c[j];
    }
  } else {
    for (size_t j = 0; j < len; ++j) o[j] = std::max(a[j], b[j]);
    for (int q = 2; q < p; ++q) {
      const float* __restrict c = in[q] + i;
      for (size_t j = 0; j < len; ++j) o[j] = std::max(o[j], c[j]);
    }
  }
}

}  // namespace

void reduce_n_f32(float* __restrict out, const float* const* in, int p, size_t n, ReduceOp op) {
  // A cache line at a time, all inputs combined while the line is in L1. (Software prefetch of the
  // inputs, which sit in other cores' caches, was tried: no measurable gain, docs/benchmarks.md.)
  constexpr size_t kLine = 16;
  size_t i = 0;
  for (; i + kLine <= n; i += kLine) combine_line<kLine>(out + i, in, p, i, kLine, op);
  if (i < n) combine_line<0>(out + i, in, p, i, n - i, op);
}

void reduce_into_f32(float* acc, const void* in, DType dtype, size_t n, ReduceOp op) {
  switch (dtype) {
    case DType::F32:
      reduce_f32(acc, static_cast<const float*>(in), n, op);
      return;
    case DType::BF16: {
      const uint16_t* h = static_cast<const uint16_t*>(in);
      if (op == ReduceOp::Sum) {
        for (size_t i = 0; i < n; ++i) acc[i] += bf16_to_f32(h[i]);
      } else {
        for (size_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], bf16_to_f32(h[i]));
      }
      return;
    }
    case DType::F16: {
      // Widen in blocks through a small stack buffer: f16_to_f32 is out of line.
      const uint16_t* h = static_cast<const uint16_t*>(in);
      float tmp[256];
      for (size_t i = 0; i < n; i += 256) {
        const size_t m = std::min<size_t>(256, n - i);
        convert(h + i, DType::F16, tmp, DType::F32, m);
        reduce_f32(acc + i, tmp, m, op);
      }
      return;
    }
    default:
      break;
  }
  fail("comm", "reduce: unsupported dtype ", dtype_name(dtype));
}

}  // namespace parallm::comm::algorithms
