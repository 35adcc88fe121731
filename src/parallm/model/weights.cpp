#include "parallm/model/weights.h"

#include <sys/stat.h>

#include <filesystem>
#include <optional>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/model/gguf.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/safetensors.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;
constexpr const char* kComponent = "weights";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// config.json beside a weights file (or in a model directory).
ModelConfig config_in(const fs::path& dir, const std::string& weights_path) {
  const fs::path cfg = dir / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(cfg, ec))
    fail(kComponent, weights_path, ": no config.json beside it (looked for ", cfg.string(), ")");
  return ModelConfig::from_file(cfg.string());
}

}  // namespace

namespace names {
std::string layer(int64_t i, const std::string& suffix) {
  return cat("model.layers.", i, ".", suffix);
}
}  // namespace names

std::unique_ptr<WeightSource> open_model(const std::string& path, ModelConfig* config) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) fail(kComponent, path, ": no such file or directory");
  // A FIFO or device would block or never end when read: only directories and regular files.
  if (!fs::is_directory(st) && !fs::is_regular_file(st)) {
    struct stat raw {};
    (void)::stat(path.c_str(), &raw);
    fail(kComponent, path, ": is ", non_regular_kind(raw.st_mode),
         ", not a model file or directory");
  }
  ModelConfig c;
  std::unique_ptr<WeightSource> source;
  const fs::path p(path);
  if (fs::is_directory(st)) {
    const bool has_weights = fs::is_regular_file(p / kSafetensorsFile, ec) ||
                             fs::is_regular_file(p / kSafetensorsIndexFile, ec);
    if (!has_weights)
      fail(kComponent, path, ": the directory holds neither ", kSafetensorsFile, " nor ",
           kSafetensorsIndexFile, " (for a llama2.c checkpoint, give the .bin file)");
    c = config_in(p, path);
    source = open_safetensors(path);
  } else if (p.filename() == "config.json") {
    return open_model(p.parent_path().empty() ? "." : p.parent_path().string(), config);
  } else if (ends_with(path, ".gguf")) {
    source = open_gguf_llama(path, &c);
  } else if (ends_with(path, ".bin")) {
    source = open_llama2c(path, &c);
  } else if (ends_with(path, ".safetensors") || ends_with(path, ".index.json") ||
             looks_like_safetensors(path)) {
    c = config_in(p.parent_path().empty() ? fs::path(".") : p.parent_path(), path);
    source = open_safetensors(path);
  } else {
    // Neither safetensors nor JSON: the llama2.c reader validates the header and the file size,
    // so anything else fails there with the sizes named.
    source = open_llama2c(path, &c);
  }
  if (config) *config = c;
  return source;
}

void check_llama_weights(const WeightSource& source, const ModelConfig& c) {
  const std::string src = source.describe();
  // The dtype config.json promises (torch_dtype), when it names one we know.
  std::optional<DType> want_dtype;
  try {
    want_dtype = parse_dtype(c.torch_dtype, "torch_dtype");
  } catch (const std::invalid_argument&) {
  }

  auto expect = [&](const std::string& name, const Shape& shape, const std::string& why) {
    if (!source.has(name))
      fail(kComponent, src, ": missing tensor \"", name, "\" (expected ", shape_str(shape), ": ",
           why, ")");
    const TensorInfo info = source.info(name);  // throws for dtypes we cannot read
    if (info.shape != shape)
      fail(kComponent, src, ": tensor \"", name, "\" has shape ", shape_str(info.shape),
           " but the config needs ", shape_str(shape), " (", why, ")");
    if (want_dtype && info.dtype != *want_dtype)
      fail(kComponent, src, ": tensor \"", name, "\" is ", dtype_name(info.dtype),
           " but config.json says torch_dtype \"", c.torch_dtype, "\"");
  };

  const std::string hs = cat("hidden_size ", c.hidden_size);
  const std::string qs = cat("num_attention_heads ", c.num_attention_heads, " x head_dim ",
                             c.head_dim, " = ", c.q_dim());
  const std::string kvs = cat("num_key_value_heads ", c.num_key_value_heads, " x head_dim ",
                              c.head_dim, " = ", c.kv_dim());
  const std::string fs_ = cat("intermediate_size ", c.intermediate_size);
  const std::string vs = cat("vocab_size ", c.vocab_size, ", ", hs);
  const std::string es = cat("num_local_experts ", c.num_local_experts);
  // The FFN width field behind a gate/up/down tensor (qwen2_moe's experts and shared expert have
  // their own).
  auto ffn_field = [&](const LlamaTensor& t) {
    if (t.name.find(".shared_expert.") != std::string::npos)
      return cat("shared_expert_intermediate_size ", c.shared_expert_intermediate_size);
    if (t.part == LlamaPart::Expert && c.is_qwen2_moe())
      return cat("moe_intermediate_size ", c.moe_intermediate_size);
    return fs_;
  };
  // The config fields behind each tensor's shape, for the message.
  auto why = [&](const LlamaTensor& t) {
    std::string w =
        t.layer >= 0 ? cat("layer ", t.layer, " of num_hidden_layers ", c.num_hidden_layers, "; ")
                     : std::string();
    switch (t.rule) {
      case ShardRule::Replicated:
        return w + (t.part == LlamaPart::Router && t.shape.at(0) == c.num_local_experts
                        ? es + ", " + hs
                        : hs);
      case ShardRule::VocabRows:
        return w + vs + (t.part == LlamaPart::LmHead ? ", tie_word_embeddings false" : "");
      case ShardRule::QHeadRows:
        return w + qs + ", " + hs;
      case ShardRule::KvHeadRows:
        return w + kvs + ", " + hs;
      case ShardRule::QHeadCols:
        return w + hs + ", " + qs;
      case ShardRule::FfnRows:
        return w + ffn_field(t) + ", " + hs;
      case ShardRule::FfnCols:
        return w + hs + ", " + ffn_field(t);
    }
    return w;
  };

  for (const LlamaTensor& t : llama_tensors(c)) expect(t.name, t.shape, why(t));
  // Tied embeddings: a checkpoint that stores lm_head anyway must still have its shape.
  if (c.tie_word_embeddings && source.has(names::kLmHead)) {
    const LlamaTensor head = llama_lm_head(c);
    expect(head.name, head.shape, why(head));
  }
  // More layers in the checkpoint than in the config means the two belong to different models.
  const std::string prefix = "model.layers.";
  for (const std::string& name : source.names()) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    int64_t layer = 0;
    size_t i = prefix.size();
    for (; i < name.size() && name[i] >= '0' && name[i] <= '9' && layer < (int64_t{1} << 40); ++i)
      layer = layer * 10 + (name[i] - '0');
    if (i > prefix.size() && layer >= c.num_hidden_layers)
      fail(kComponent, src, ": tensor \"", name, "\" belongs to layer ", layer,
           " but the config has num_hidden_layers ", c.num_hidden_layers);
  }
}

}  // namespace parallm
