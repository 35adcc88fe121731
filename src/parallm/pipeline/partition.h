// Stage partition: which layers each pipeline stage holds.
#pragma once

#include <cstdint>
#include <vector>

namespace parallm::pipeline {

struct StageLayers {
  int64_t begin = 0, end = 0;  // layers [begin, end)
  int64_t count() const { return end - begin; }
};

// `pp` stages over `layers` layers. Empty `explicit_counts`: as even as possible, the leftover
// layers going to the middle stages (the first stage also holds the embedding and the last the LM
// head, so they get the smaller shares). Otherwise the counts given (--pp-layers 6,5,5,6): one per
// stage, each >= 1, summing to `layers`; std::invalid_argument naming the numbers otherwise.
std::vector<StageLayers> partition_layers(int64_t layers, int pp,
                                          const std::vector<int64_t>& explicit_counts = {});

}  // namespace parallm::pipeline
