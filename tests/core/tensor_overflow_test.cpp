// Tensor::empty refusing shapes whose byte count overflows instead of allocating a wrapped,
// too-small buffer (core/checked.h itself: tests/core/checked_json_limits_test.cpp).
#include <gtest/gtest.h>

#include <limits>

#include "parallm/core/tensor.h"

namespace parallm {
namespace {

TEST(Overflow, TensorEmptyRefusesOverflowingShapes) {
  // 2^62 elements fit int64 but their f32 bytes do not; 2^40 x 2^40 does not fit at all.
  try {
    Tensor::empty(DType::F32, {int64_t{1} << 31, int64_t{1} << 31});
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("[2147483648, 2147483648]"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(Tensor::empty(DType::BF16, {int64_t{1} << 40, int64_t{1} << 40}),
               std::invalid_argument);
  EXPECT_EQ(Tensor::empty(DType::F32, {0, int64_t{1} << 62}).nbytes(), 0u);
}

}  // namespace
}  // namespace parallm
