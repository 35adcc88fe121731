// What the training tests that compare against tests/reference/train_ref.py (PyTorch) share:
// whether the reference can run, reading the F64 safetensors it writes, and the relative error
// measure.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.h"

namespace parallm::testing {

// Empty when /usr/bin/python3 imports torch and numpy; else why not.
inline std::string torch_missing() {
  auto r = run_command("/usr/bin/python3 -c 'import torch, numpy'");
  return r.exit_code == 0 ? "" : "/usr/bin/python3 cannot import torch and numpy: " + r.output;
}

// A safetensors file of F64 tensors, as train_ref.py writes it.
inline std::map<std::string, std::vector<double>> read_f64_safetensors(const std::string& path) {
  std::map<std::string, std::vector<double>> out;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << path << ": the reference wrote nothing";
    return out;
  }
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  const char* base = bytes.data() + 8 + n;
  for (auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const auto b = info["data_offsets"][0].get<size_t>(), e = info["data_offsets"][1].get<size_t>();
    std::vector<double> v((e - b) / 8);
    std::memcpy(v.data(), base + b, e - b);
    out[name] = std::move(v);
  }
  return out;
}

// ||a - b|| / ||b|| over b's elements.
inline double rel_frobenius(const float* a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

}  // namespace parallm::testing
