// Internal to kernels/: row primitives shared by ops.cpp and attention.cpp, each dispatched on a
// SimdLevel chosen once per kernel call.
#pragma once

#include <cstdint>

#include "parallm/kernels/cpu.h"

namespace parallm::kernels::vec {

// sum_i a[i] * b[i]
float dot(const float* a, const float* b, int64_t n, SimdLevel level);
// y[i] += alpha * x[i]
void axpy(float alpha, const float* x, float* y, int64_t n, SimdLevel level);
// y[i] *= alpha
void scale(float alpha, float* y, int64_t n, SimdLevel level);
// sum_i x[i]^2
float sum_squares(const float* x, int64_t n, SimdLevel level);
// Softmax of n values in place; returns nothing, n >= 1.
void softmax(float* x, int64_t n, SimdLevel level);

}  // namespace parallm::kernels::vec
