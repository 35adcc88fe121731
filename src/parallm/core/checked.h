// Checked integer arithmetic for the places where shapes become element counts or bytes: a
// product that does not fit is an error naming what was multiplied, never a wrapped count that
// runs (a "4611686018.43 B parameters" model) or sizes an allocation.
#pragma once

#include <string_view>
#include <type_traits>

#include "parallm/core/error.h"

namespace parallm {

// a * b, or std::invalid_argument "[overflow] <what>: a x b does not fit in N bits".
// `what` names the operands for the user: "config.json: vocab_size x hidden_size".
template <class T>
T checked_mul(T a, T b, std::string_view what) {
  static_assert(std::is_integral_v<T>);
  T r;
  if (__builtin_mul_overflow(a, b, &r))
    fail("overflow", what, ": ", a, " x ", b, " does not fit in ", sizeof(T) * 8, " bits");
  return r;
}

// a + b, or std::invalid_argument "[overflow] <what>: a + b does not fit in N bits".
template <class T>
T checked_add(T a, T b, std::string_view what) {
  static_assert(std::is_integral_v<T>);
  T r;
  if (__builtin_add_overflow(a, b, &r))
    fail("overflow", what, ": ", a, " + ", b, " does not fit in ", sizeof(T) * 8, " bits");
  return r;
}

}  // namespace parallm
