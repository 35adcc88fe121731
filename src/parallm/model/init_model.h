// Random models in Hugging Face format (config.json + model.safetensors), for tests and for
// benchmarks of real shape: random weights are honest for speed.
#pragma once

#include <cstdint>
#include <string>

#include "parallm/core/dtype.h"
#include "parallm/model/config.h"

namespace parallm {

// Named shapes: "tiny" (tests: 3 layers, 12 heads / 6 KV heads so TP 1, 2, 3, 6 and 12 fit, FFN
// and vocab that split unevenly), "tinyllama-1.1b" (hidden 2048, 22 layers, 32 heads, 4 KV
// heads, FFN 5632, vocab 32000), "mixtral-tiny" (MoE tests: 8 experts, top-2, 2 layers) and
// "mixtral-8x7b" (the real shape, 32 layers; init-model --layers keeps fewer), "qwen2-moe-tiny"
// (qwen2_moe tests: 8 experts, top-2, a shared expert, q/k/v biases, layer 1 dense).
// Throws std::invalid_argument listing the names otherwise.
ModelConfig shape_preset(const std::string& name);
std::string shape_preset_names();

// Writes `out_dir`/config.json and `out_dir`/model.safetensors with weights drawn from a seeded
// generator: matrices uniform with std 1/sqrt(fan_in), the embedding with std 1, norms near 1.
// The same (config, seed, dtype) gives the same bytes.
// Refuses (std::invalid_argument naming the sizes) a config too large to generate: over
// kMaxInitModelParams parameters, or weight bytes above the machine's physical memory. Directories
// it creates are removed again when it fails, so a failed call leaves nothing behind.
void init_random_model(const ModelConfig& config, const std::string& out_dir, uint64_t seed,
                       DType dtype);

// The size check init_random_model makes first.
constexpr int64_t kMaxInitModelParams = 1'000'000'000'000;
void check_init_model_size(const ModelConfig& config, DType dtype);

// init_random_model's writing step alone, into an existing directory.
void write_random_model(const ModelConfig& config, const std::string& out_dir, uint64_t seed,
                        DType dtype);

}  // namespace parallm
