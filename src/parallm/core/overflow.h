// Checked arithmetic for sizes: wherever a shape becomes an element count or a byte count, a
// product that overflows int64 is an error naming what was being sized, never a wrapped value
// that allocates too little and writes past it.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string_view>

#include "parallm/core/error.h"

namespace parallm {

// a x b, or std::invalid_argument "[overflow] <what>: a x b overflows int64". Both must be >= 0.
inline int64_t mul_checked(int64_t a, int64_t b, std::string_view what) {
  int64_t r = 0;
  if (a < 0 || b < 0) fail("overflow", what, ": negative factor in ", a, " x ", b);
  if (__builtin_mul_overflow(a, b, &r))
    fail("overflow", what, ": ", a, " x ", b, " overflows a 64-bit size");
  return r;
}

// a + b for sizes, the same way.
inline int64_t add_checked(int64_t a, int64_t b, std::string_view what) {
  int64_t r = 0;
  if (a < 0 || b < 0) fail("overflow", what, ": negative term in ", a, " + ", b);
  if (__builtin_add_overflow(a, b, &r))
    fail("overflow", what, ": ", a, " + ", b, " overflows a 64-bit size");
  return r;
}

}  // namespace parallm
