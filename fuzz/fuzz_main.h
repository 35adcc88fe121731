// Shared by the libFuzzer targets: the contract every parser is fuzzed against. Any input either
// parses or throws a std::exception (a clean, one-line error); anything else -- a crash, a
// sanitizer report, an exception of another type, a hang, a huge allocation -- is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string_view>

namespace parallm::fuzz {

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs `body`, swallowing the clean errors; anything else escapes to libFuzzer (an uncaught
// exception of another type terminates, which libFuzzer reports as a crash).
template <class F>
void expect_clean(F&& body) {
  try {
    body();
  } catch (const std::exception&) {
  }
}

}  // namespace parallm::fuzz
