// Model presets for the planner: the published shapes of common LLaMA-family models, so that a
// plan needs no download. Any Hugging Face config.json works as well (resolve_model).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "parallm/model/config.h"

namespace parallm::plan {

struct ModelPreset {
  std::string name;         // "llama-2-70b"
  double published_params;  // the figure model cards give, for tests and for users to compare
  ModelConfig config;
};

const std::vector<ModelPreset>& model_presets();
std::vector<std::string> model_preset_names();

// A preset name, a config.json path, or a directory holding config.json. Throws
// std::invalid_argument naming `spec` and listing the presets when it is none of these.
ModelConfig resolve_model(const std::string& spec, std::string* display_name = nullptr);

// Parameters one token runs through: dense layers, the k routed experts of an MoE layer, the
// output projection; not the embedding lookup (a gather, no FLOPs).
double active_params_per_token(const ModelConfig& c);

}  // namespace parallm::plan
