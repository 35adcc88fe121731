#include "parallm/comm/algorithms/reduce.h"

#include <algorithm>

#include "parallm/core/error.h"

namespace parallm::comm::algorithms {

void reduce_f32(float* __restrict acc, const float* __restrict in, size_t n, ReduceOp op) {
  if (op == ReduceOp::Sum) {
    for (size_t i = 0; i < n; ++i) acc[i] += in[i];
  } else {
    for (size_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], in[i]);
  }
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
  }
  fail("comm", "reduce: unsupported dtype ", dtype_name(dtype));
}

}  // namespace parallm::comm::algorithms
