#include "parallm/plan/model_presets.h"

#include <filesystem>

#include "parallm/core/error.h"
#include "parallm/model/init_model.h"

namespace parallm::plan {
namespace {

ModelConfig llama(int64_t hidden, int64_t ffn, int64_t layers, int64_t heads, int64_t kv_heads,
                  int64_t vocab, int64_t max_pos, double theta, bool tied = false) {
  ModelConfig c;
  c.hidden_size = hidden;
  c.intermediate_size = ffn;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.vocab_size = vocab;
  c.max_position_embeddings = max_pos;
  c.rope_theta = theta;
  c.tie_word_embeddings = tied;
  c.torch_dtype = "bfloat16";
  return c;
}

ModelConfig moe(ModelConfig c, int64_t experts, int64_t top_k) {
  c.architecture = "MixtralForCausalLM";
  c.num_local_experts = experts;
  c.num_experts_per_tok = top_k;
  return c;
}

std::vector<ModelPreset> make_presets() {
  // Shapes from the models' config.json files on the Hugging Face hub; parameter counts from
  // their model cards / papers.
  return {
      {"llama-2-7b", 6.74e9, llama(4096, 11008, 32, 32, 32, 32000, 4096, 1e4)},
      {"llama-2-13b", 13.02e9, llama(5120, 13824, 40, 40, 40, 32000, 4096, 1e4)},
      {"llama-2-70b", 68.98e9, llama(8192, 28672, 80, 64, 8, 32000, 4096, 1e4)},
      {"llama-3-8b", 8.03e9, llama(4096, 14336, 32, 32, 8, 128256, 8192, 5e5)},
      {"llama-3-70b", 70.55e9, llama(8192, 28672, 80, 64, 8, 128256, 8192, 5e5)},
      {"llama-3-405b", 405.85e9, llama(16384, 53248, 126, 128, 8, 128256, 131072, 5e5)},
      {"llama-3.2-1b", 1.24e9, llama(2048, 8192, 16, 32, 8, 128256, 131072, 5e5, true)},
      {"llama-3.2-3b", 3.21e9, llama(3072, 8192, 28, 24, 8, 128256, 131072, 5e5, true)},
      {"mistral-7b", 7.24e9, llama(4096, 14336, 32, 32, 8, 32000, 32768, 1e6)},
      {"mixtral-8x7b", 46.70e9, moe(llama(4096, 14336, 32, 32, 8, 32000, 32768, 1e6), 8, 2)},
      {"mixtral-8x22b", 140.6e9, moe(llama(6144, 16384, 56, 48, 8, 32768, 65536, 1e6), 8, 2)},
      {"tinyllama-1.1b", 1.10e9, llama(2048, 5632, 22, 32, 4, 32000, 2048, 1e4)},
  };
}

}  // namespace

const std::vector<ModelPreset>& model_presets() {
  static const std::vector<ModelPreset> presets = make_presets();
  return presets;
}

std::vector<std::string> model_preset_names() {
  std::vector<std::string> names;
  for (const auto& p : model_presets()) names.push_back(p.name);
  return names;
}

ModelConfig resolve_model(const std::string& spec, std::string* display_name) {
  std::string name = spec;
  // Accept the 3.1 spelling of the 405B model.
  if (name == "llama-3.1-405b") name = "llama-3-405b";
  for (const auto& p : model_presets()) {
    if (p.name == name) {
      if (display_name) *display_name = p.name;
      return p.config;
    }
  }
  // The shapes `parallm init-model` and `train --init` make (tiny, small, bench-30m): what the
  // planner is held to on this machine.
  for (const char* shape : {"tiny", "small", "bench-30m"}) {
    if (shape == name) {
      if (display_name) *display_name = name;
      return shape_preset(name);
    }
  }
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path path(spec);
  if (fs::is_directory(path, ec)) path /= "config.json";
  if (fs::exists(path, ec)) {
    if (display_name) *display_name = path.string();
    return ModelConfig::from_file(path.string());  // validated: shapes whose counts overflow refused
  }
  fail("plan", "--model: \"", spec, "\" is neither a preset (", join(model_preset_names(), ", "),
       "; or parallm's shapes tiny, small, bench-30m) nor a config.json file or a directory "
       "holding one");
}

double active_params_per_token(const ModelConfig& c) {
  const double h = double(c.hidden_size);
  const double attn = h * c.q_dim() + 2 * h * c.kv_dim() + double(c.q_dim()) * h;
  const double expert = 3 * h * double(c.intermediate_size);
  const double mlp = c.is_moe() ? c.num_experts_per_tok * expert + h * c.num_local_experts : expert;
  return double(c.num_hidden_layers) * (attn + mlp) + double(c.vocab_size) * h;
}

}  // namespace parallm::plan
