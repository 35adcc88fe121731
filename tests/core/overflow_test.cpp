// Checked size arithmetic (core/overflow.h) and Tensor::empty refusing shapes whose byte count
// overflows instead of allocating a wrapped, too-small buffer.
#include "parallm/core/overflow.h"

#include <gtest/gtest.h>

#include <limits>

#include "parallm/core/tensor.h"

namespace parallm {
namespace {

TEST(Overflow, MulChecked) {
  EXPECT_EQ(mul_checked(3, 4, "x"), 12);
  EXPECT_EQ(mul_checked(0, std::numeric_limits<int64_t>::max(), "x"), 0);
  EXPECT_EQ(mul_checked(int64_t{1} << 31, int64_t{1} << 31, "x"), int64_t{1} << 62);
  try {
    mul_checked(int64_t{1} << 32, int64_t{1} << 31, "the widget count");
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("the widget count"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("4294967296 x 2147483648"), std::string::npos) << e.what();
  }
  EXPECT_THROW(mul_checked(-1, 2, "x"), std::invalid_argument);
  EXPECT_EQ(add_checked(2, 3, "x"), 5);
  EXPECT_THROW(add_checked(std::numeric_limits<int64_t>::max(), 1, "x"), std::invalid_argument);
}

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
