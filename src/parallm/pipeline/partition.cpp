#include "parallm/pipeline/partition.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "parallm/core/error.h"

namespace parallm::pipeline {

std::vector<StageLayers> partition_layers(int64_t layers, int pp,
                                          const std::vector<int64_t>& explicit_counts) {
  if (pp < 1) fail("pipeline", "--pp must be >= 1, got ", pp);
  if (pp > layers)
    fail("pipeline", "--pp ", pp, " is more stages than the model's ", layers, " layers");
  std::vector<int64_t> counts = explicit_counts;
  if (counts.empty()) {
    counts.assign(pp, layers / pp);
    // Hand the leftover layers to the stages nearest the middle, one each.
    std::vector<int> order(pp);
    std::iota(order.begin(), order.end(), 0);
    const double centre = (pp - 1) / 2.0;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return std::abs(a - centre) < std::abs(b - centre); });
    for (int64_t i = 0; i < layers % pp; ++i) ++counts[order[i]];
  } else {
    if (static_cast<int>(counts.size()) != pp)
      fail("pipeline", "--pp-layers ", join(counts, ","), " gives ", counts.size(),
           " stages but --pp is ", pp);
    int64_t sum = 0;
    for (int64_t c : counts) {
      if (c < 1)
        fail("pipeline", "--pp-layers ", join(counts, ","), ": every stage needs >= 1 layer");
      sum += c;
    }
    if (sum != layers)
      fail("pipeline", "--pp-layers ", join(counts, ","), " sums to ", sum, " but the model has ",
           layers, " layers");
  }
  std::vector<StageLayers> out(pp);
  int64_t at = 0;
  for (int s = 0; s < pp; ++s) {
    out[s] = {at, at + counts[s]};
    at += counts[s];
  }
  return out;
}

}  // namespace parallm::pipeline
