#include "parallm/model/init_model.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "parallm/core/error.h"
#include "parallm/core/checked.h"
#include "parallm/core/thread_pool.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/weights.h"

namespace parallm {
namespace {

// splitmix64: a fast, well-mixed counter-based generator, so any element can be generated
// independently (and so in parallel) from (seed, tensor index, element index).
inline uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [mean - a, mean + a) with a = std * sqrt(3), so the standard deviation is `std`.
Tensor random_tensor(Shape shape, DType dtype, uint64_t seed, uint64_t index, float mean,
                     float std) {
  Tensor f = Tensor::empty(DType::F32, std::move(shape));
  float* p = f.data<float>();
  const float a = std * std::sqrt(3.0f);
  const uint64_t base = mix(seed ^ mix(index + 1));
  ThreadPool::current().parallel_for(f.numel(), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double u = static_cast<double>(mix(base + static_cast<uint64_t>(i)) >> 11) * 0x1.0p-53;
      p[i] = mean + a * static_cast<float>(2.0 * u - 1.0);
    }
  });
  return dtype == DType::F32 ? f : f.to(dtype);
}

// The machine's physical memory in bytes (0 when unknown).
uint64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
}

// The first missing directory on the way to `dir` (what create_directories would create first),
// or "" when `dir` exists: removing it undoes the whole creation.
std::filesystem::path first_missing(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path missing;
  for (fs::path p = fs::absolute(dir, ec); !p.empty(); p = p.parent_path()) {
    if (fs::exists(p, ec)) break;
    missing = p;
    if (p == p.parent_path()) break;
  }
  return missing;
}

}  // namespace

void check_init_model_size(const ModelConfig& c, DType dtype) {
  // Every tensor is generated in memory before the file is written, so the model must fit; and a
  // fixed ceiling far above any real model catches a typo'd size on a machine of any memory.
  const int64_t params = c.param_count();  // validated: does not overflow
  if (params > kMaxInitModelParams)
    fail("init-model", "the config makes ", params, " parameters, over the limit of ",
         kMaxInitModelParams, " (num_hidden_layers ", c.num_hidden_layers, ", hidden_size ",
         c.hidden_size, ")");
  const int64_t bytes =
      checked_mul<int64_t>(params, static_cast<int64_t>(dtype_size(dtype)), "init-model weight bytes");
  const uint64_t mem = physical_memory_bytes();
  if (mem != 0 && static_cast<uint64_t>(bytes) > mem)
    fail("init-model", "the config makes ", params, " parameters (", bytes, " bytes as ",
         dtype_name(dtype), "), more than this machine's ", mem,
         " bytes of memory (num_hidden_layers ", c.num_hidden_layers, ", hidden_size ",
         c.hidden_size, ")");
}

std::string shape_preset_names() {
  return "tiny, small, bench-30m, tinyllama-1.1b, mixtral-tiny, mixtral-8x7b, qwen2-moe-tiny";
}

ModelConfig shape_preset(const std::string& name) {
  ModelConfig c;
  if (name == "tiny") {
    c.hidden_size = 96;
    c.intermediate_size = 200;
    c.num_hidden_layers = 3;
    c.num_attention_heads = 12;
    c.num_key_value_heads = 6;
    c.head_dim = 8;
    c.vocab_size = 250;
    c.max_position_embeddings = 256;
    c.rope_theta = 10000.0;
    c.torch_dtype = "float32";
  } else if (name == "small") {
    // 3.4 M parameters with a 2048-token vocabulary: trains for real in minutes on two cores (the
    // README's main job). 8 heads over 4 KV heads, so TP 2 and 4 fit.
    c.hidden_size = 256;
    c.intermediate_size = 688;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.head_dim = 32;
    c.vocab_size = 2048;
    c.max_position_embeddings = 512;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = true;
    c.torch_dtype = "float32";
  } else if (name == "bench-30m") {
    // 33.7 M parameters (parallm bench train's default): big enough that the matrix products
    // dominate, small enough to run in seconds on a few cores.
    c.hidden_size = 512;
    c.intermediate_size = 1376;
    c.num_hidden_layers = 8;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    c.head_dim = 64;
    c.vocab_size = 8192;
    c.max_position_embeddings = 2048;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = false;
    c.torch_dtype = "float32";
  } else if (name == "mixtral-tiny") {
    // Mixtral-shaped for the MoE tests: 8 experts, top-2, so EP 1..8 fit (3 unevenly); 4 heads
    // over 2 KV heads and an FFN of 96 for TP 2.
    c.architecture = "MixtralForCausalLM";
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.vocab_size = 160;
    c.max_position_embeddings = 256;
    c.rope_theta = 10000.0;
    c.torch_dtype = "float32";
    c.num_local_experts = 8;
    c.num_experts_per_tok = 2;
  } else if (name == "qwen2-moe-tiny") {
    // Qwen2-MoE-shaped for the tests: 8 experts, top-2 without renormalisation, a shared expert,
    // q/k/v biases; 3 layers with layer 1 a dense MLP (mlp_only_layers), so both kinds run. Four
    // heads over 2 KV heads and FFNs of 48 (experts), 80 (shared), 112 (dense) for TP 2.
    c.architecture = "Qwen2MoeForCausalLM";
    c.model_type = "qwen2_moe";
    c.hidden_size = 64;
    c.intermediate_size = 112;
    c.num_hidden_layers = 3;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.vocab_size = 160;
    c.max_position_embeddings = 256;
    c.rope_theta = 1e6;
    c.torch_dtype = "float32";
    c.num_local_experts = 8;
    c.num_experts_per_tok = 2;
    c.norm_topk_prob = false;
    c.moe_intermediate_size = 48;
    c.shared_expert_intermediate_size = 80;
    c.decoder_sparse_step = 1;
    c.mlp_only_layers = {1};
    c.attention_bias = true;
  } else if (name == "mixtral-8x7b") {
    // Mixtral-8x7B's shape (46.7 B parameters in 32 layers): with init-model --layers N, a few
    // real-shaped layers for benchmarks (each layer 1.4 B parameters, 2.9 GB in bf16).
    c.architecture = "MixtralForCausalLM";
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8;
    c.head_dim = 128;
    c.vocab_size = 32000;
    c.max_position_embeddings = 32768;
    c.rope_theta = 1e6;
    c.torch_dtype = "bfloat16";
    c.num_local_experts = 8;
    c.num_experts_per_tok = 2;
  } else if (name == "tinyllama-1.1b") {
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    c.num_hidden_layers = 22;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 4;
    c.head_dim = 64;
    c.vocab_size = 32000;
    c.max_position_embeddings = 2048;
    c.rope_theta = 10000.0;
    c.torch_dtype = "bfloat16";
  } else {
    fail("init-model", "unknown --shape \"", name, "\" (known: ", shape_preset_names(),
         ", or a path to a config.json)");
  }
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.validate("shape " + name);
  return c;
}

void init_random_model(const ModelConfig& c, const std::string& out_dir, uint64_t seed,
                       DType dtype) {
  namespace fs = std::filesystem;
  c.validate("init-model config");
  check_init_model_size(c, dtype);
  // Nothing is left behind on failure: the directories this call creates are removed again, and
  // each file is written beside its target and renamed into place only when complete.
  const fs::path created = first_missing(out_dir);
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec)
    fail<std::runtime_error>("init-model", out_dir, ": cannot create directory: ", ec.message());
  try {
    write_random_model(c, out_dir, seed, dtype);
  } catch (...) {
    if (!created.empty()) fs::remove_all(created, ec);
    throw;
  }
}

void write_random_model(const ModelConfig& c, const std::string& out_dir, uint64_t seed,
                        DType dtype) {
  namespace fs = std::filesystem;
  ModelConfig cfg = c;
  cfg.torch_dtype = dtype == DType::F32 ? "float32" : dtype == DType::BF16 ? "bfloat16" : "float16";

  // Every tensor of the table, in its order (the order numbers the generator's streams, so it
  // fixes the bytes): matrices uniform with std 1/sqrt(fan_in = columns), the embedding std 1,
  // norms near 1.
  std::vector<std::pair<std::string, Tensor>> tensors;
  uint64_t index = 0;
  for (const LlamaTensor& t : llama_tensors(c)) {
    float mean = 0.0f, std = 1.0f;
    if (t.part == LlamaPart::Norm && t.name.size() > 5 &&
        t.name.compare(t.name.size() - 5, 5, ".bias") == 0) {
      std = 0.5f;  // q/k/v biases: centred, large enough to matter
    } else if (t.part == LlamaPart::Norm) {
      mean = 1.0f;
      std = 0.1f;
    } else if (t.part != LlamaPart::Embedding) {
      std = 1.0f / std::sqrt(static_cast<float>(t.shape.at(1)));
    }
    tensors.emplace_back(t.name, random_tensor(t.shape, dtype, seed, index++, mean, std));
  }

  write_safetensors(
      (fs::path(out_dir) / "model.safetensors").string(), tensors,
      {{"format", "pt"}, {"generator", "parallm init-model"}, {"seed", std::to_string(seed)}});
  const std::string config_path = (fs::path(out_dir) / "config.json").string();
  const std::string tmp_path = cat(config_path, ".tmp.", ::getpid());
  {
    std::ofstream out(tmp_path);
    out << cfg.to_json().dump(2) << "\n";
    out.close();
    if (!out) {
      std::remove(tmp_path.c_str());
      fail<std::runtime_error>("init-model", config_path, ": write failed");
    }
  }
  if (std::rename(tmp_path.c_str(), config_path.c_str()) != 0) {
    std::remove(tmp_path.c_str());
    fail<std::runtime_error>("init-model", config_path, ": cannot rename ", tmp_path, " to it");
  }
}

}  // namespace parallm
