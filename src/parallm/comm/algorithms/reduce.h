// Element-wise reductions and the block partition the algorithms share.
// Every reduction accumulates in f32: bf16 and f16 are widened, combined and rounded once at the
// end.
#pragma once

#include <cstddef>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/dtype.h"

namespace parallm::comm::algorithms {

// acc[i] = acc[i] (op) in[i] over n floats.
void reduce_f32(float* __restrict acc, const float* __restrict in, size_t n, ReduceOp op);
// acc[i] = acc[i] (op) widen(in[i]), in of any dtype.
void reduce_into_f32(float* acc, const void* in, DType dtype, size_t n, ReduceOp op);
// out[i] = in[0][i] (op) in[1][i] (op) ... (op) in[p-1][i], combined in that order for every
// element, so every rank that computes it gets bitwise the same result.
void reduce_n_f32(float* __restrict out, const float* const* in, int p, size_t n, ReduceOp op);

// Balanced partition of `count` elements into `parts` blocks (the first count % parts blocks get
// one more). Block i is [block_begin(i), block_begin(i + 1)).
inline size_t block_begin(size_t count, int parts, int i) {
  const size_t base = count / parts, extra = count % parts;
  return base * i + (static_cast<size_t>(i) < extra ? i : extra);
}

}  // namespace parallm::comm::algorithms
