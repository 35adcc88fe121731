// Helpers shared by the tests: temporary directories and running the parallm binary.
#pragma once

#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "temp_dir.h"

namespace parallm::testing {

// The message of the std::invalid_argument that f throws ("no error" if none; another exception
// type is reported as wrong, since caller mistakes must be std::invalid_argument).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("WRONG EXCEPTION TYPE: ") + e.what();
  }
  return "no error";
}

// max |a - b| / max |b|: the normalised error the equality tests bound.
template <class A, class B>
double normalised_error(const std::vector<A>& a, const std::vector<B>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num = std::max<double>(num, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max<double>(den, std::abs(static_cast<double>(b[i])));
  }
  return num / den;
}

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs a shell command, capturing stdout+stderr.
inline CommandResult run_command(const std::string& cmd) {
  CommandResult r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

// Runs the parallm binary with `args`.
inline CommandResult run_parallm(const std::string& args) {
  return run_command(std::string(PARALLM_BIN) + " " + args);
}

// The pretrained stories260K checkpoint kept in the repository (models/stories260K/README.md).
inline std::string stories_model() {
  return std::string(PARALLM_SOURCE_DIR) + "/models/stories260K/stories260K.bin";
}

}  // namespace parallm::testing
