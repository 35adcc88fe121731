// Errors: exceptions whose message starts with a component prefix and names the values at fault,
// e.g. "[safetensors] model.safetensors: tensor "x" ends at byte 912 but the file has 800".
// std::invalid_argument for caller mistakes, std::runtime_error for the environment.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace parallm {

// Concatenates anything printable with operator<<.
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

// Throws E("[component] message...").
template <class E = std::invalid_argument, class... Args>
[[noreturn]] void fail(std::string_view component, const Args&... args) {
  throw E(cat("[", component, "] ", args...));
}

// Joins a range with a separator: join({1,2,3}, ",") == "1,2,3".
template <class Range>
std::string join(const Range& r, std::string_view sep) {
  std::ostringstream s;
  bool first = true;
  for (const auto& v : r) {
    if (!first) s << sep;
    s << v;
    first = false;
  }
  return s.str();
}

}  // namespace parallm
