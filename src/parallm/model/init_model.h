// Random models in Hugging Face format (config.json + model.safetensors), for tests and for
// benchmarks of real shape: random weights are honest for speed.
#pragma once

#include <cstdint>
#include <string>

#include "parallm/core/dtype.h"
#include "parallm/model/config.h"

namespace parallm {

// Named shapes: "tiny" (tests: 3 layers, 12 heads / 6 KV heads so TP 1, 2, 3, 6 and 12 fit, FFN
// and vocab that split unevenly) and "tinyllama-1.1b" (hidden 2048, 22 layers, 32 heads, 4 KV
// heads, FFN 5632, vocab 32000). Throws std::invalid_argument listing the names otherwise.
ModelConfig shape_preset(const std::string& name);
std::string shape_preset_names();

// Writes `out_dir`/config.json and `out_dir`/model.safetensors with weights drawn from a seeded
// generator: matrices uniform with std 1/sqrt(fan_in), the embedding with std 1, norms near 1.
// The same (config, seed, dtype) gives the same bytes.
void init_random_model(const ModelConfig& config, const std::string& out_dir, uint64_t seed,
                       DType dtype);

}  // namespace parallm
