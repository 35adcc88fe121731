// Helpers of the layer tests: run a function on every rank of a local TP group, random full
// weights, and a rank's slice of them (cut here, independently of the loader).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/core/tensor.h"
#include "parallm/parallel/shard.h"

namespace parallm::testing {

// Ranks as threads; fn(group) runs once per rank.
template <class F>
void run_tp(int tp, F&& fn) {
  comm::LaunchOptions o;
  o.backend = "local";
  o.timeout_s = 60;
  comm::launch(tp, o, [&](comm::Group g) { fn(g); });
}

// Values uniform in [-scale, scale), reproducible from `seed`.
inline std::vector<float> random_floats(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

inline Tensor random_matrix(int64_t rows, int64_t cols, uint32_t seed, float scale = 0.5f) {
  Tensor t = Tensor::empty(DType::F32, {rows, cols});
  std::vector<float> v = random_floats(rows * cols, seed, scale);
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}

// Rows / columns [s.begin, s.end) of a full 2-D tensor, as a contiguous copy.
inline Tensor rows_of(const Tensor& full, const parallel::ShardSpec& s) {
  return full.slice_rows(s.begin, s.end).contiguous();
}
inline Tensor cols_of(const Tensor& full, const parallel::ShardSpec& s) {
  return full.slice_cols(s.begin, s.end).contiguous();
}

// The rows a fused spec names, cut from the full tensors (`full_of(part name)`), stacked.
template <class FullOf>
Tensor fused_rows(const parallel::FusedShardSpec& spec, FullOf&& full_of) {
  const int64_t cols = full_of(spec.parts.at(0).name).dim(1);
  Tensor out = Tensor::empty(DType::F32, {spec.size(), cols});
  for (size_t i = 0; i < spec.parts.size(); ++i) {
    const parallel::FusedPart& p = spec.parts[i];
    const Tensor& full = full_of(p.name);
    EXPECT_EQ(full.dim(0), p.rows.full) << p.name;
    Tensor part = rows_of(full, p.rows);
    std::copy(part.data<float>(), part.data<float>() + part.numel(),
              out.data<float>() + spec.offset(i) * cols);
  }
  return out;
}

// The relative error the layer tests bound: max |a - b| / max |b|.
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size() && i < a.size(); ++i) {
    num = std::max<double>(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max<double>(den, std::abs(double(b[i])));
  }
  return den == 0 ? num : num / den;
}

}  // namespace parallm::testing
