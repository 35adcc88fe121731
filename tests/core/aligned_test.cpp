#include "parallm/core/aligned.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace parallm {
namespace {

template <class T>
bool line_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 64 == 0;
}

TEST(AlignedVector, StaysOnACacheLineThroughGrowthAndKeepsItsValues) {
  // malloc gives 16-byte alignment: small allocations in between move the heap's next address.
  std::vector<std::unique_ptr<char[]>> noise;
  AlignedVector<float> f;
  AlignedVector<uint16_t> h;
  int prev = 0;
  for (int n = 1; n <= 70000; n = n * 3 + 5) {
    noise.emplace_back(new char[n % 97 + 1]);
    f.resize(n, 1.5f);
    h.resize(n, 7);
    ASSERT_TRUE(line_aligned(f.data())) << n << " floats at " << f.data();
    ASSERT_TRUE(line_aligned(h.data())) << n << " halves at " << h.data();
    if (prev > 0) {
      EXPECT_EQ(f[prev - 1], static_cast<float>(prev));  // moved with the growth
    }
    EXPECT_EQ(f[n - 1], 1.5f);
    EXPECT_EQ(h[n - 1], 7);
    f[n - 1] = static_cast<float>(n);
    prev = n;
  }
  AlignedVector<float> copy = f;
  EXPECT_TRUE(line_aligned(copy.data()));
  EXPECT_EQ(copy, f);
}

}  // namespace
}  // namespace parallm
