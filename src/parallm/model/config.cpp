#include "parallm/model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "parallm/core/error.h"
#include "parallm/core/checked.h"
#include "parallm/core/json_limits.h"

namespace parallm {
namespace {

using nlohmann::json;

const json& require(const json& j, const char* field, const std::string& source) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null())
    fail("config", source, ": missing required field \"", field, "\"");
  return *it;
}

// An integer value at `field` (a path such as "rope_scaling.original_max_position_embeddings"),
// or an error naming the path and a short preview of what is there instead.
int64_t as_int(const json& v, const std::string& field, const std::string& source) {
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    fail("config", source, ": field \"", field, "\" is out of range, got ", json_preview(v));
  if (!v.is_number_integer())
    fail("config", source, ": field \"", field, "\" must be an integer, got ", json_preview(v));
  return v.get<int64_t>();
}

int64_t get_int(const json& j, const char* field, const std::string& source) {
  return as_int(require(j, field, source), field, source);
}

double get_num(const json& v, const char* field, const std::string& source) {
  if (!v.is_number())
    fail("config", source, ": field \"", field, "\" must be a number, got ", json_preview(v));
  return v.get<double>();
}

bool get_bool(const json& j, const char* field, const std::string& source) {
  const json& v = j.at(field);
  if (!v.is_boolean())
    fail("config", source, ": field \"", field, "\" must be true or false, got ", json_preview(v));
  return v.get<bool>();
}

bool has(const json& j, const char* field) {
  return j.contains(field) && !j[field].is_null();
}

}  // namespace

bool ModelConfig::layer_is_moe(int64_t layer) const {
  if (!is_moe()) return false;
  if (!is_qwen2_moe()) return true;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
    return false;
  return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

int64_t ModelConfig::param_count() const {
  // Checked: a config with dimensions near 2^62 is an error naming the count, not a wrapped sum.
  constexpr std::string_view w = "the model's parameter count";
  auto mul = [&](int64_t a, int64_t b) { return checked_mul<int64_t>(a, b, w); };
  auto add = [&](int64_t a, int64_t b) { return checked_add<int64_t>(a, b, w); };
  const int64_t h = hidden_size;
  const int64_t q = mul(num_attention_heads, head_dim), kv = mul(num_key_value_heads, head_dim);
  int64_t attn = add(add(mul(h, q), mul(2, mul(h, kv))), mul(q, h));
  if (attention_bias) attn = add(attn, add(q, mul(2, kv)));
  const int64_t dense = mul(3, mul(h, intermediate_size));
  int64_t sparse =
      add(mul(num_local_experts, mul(3, mul(h, expert_ffn()))), mul(h, num_local_experts));
  if (has_shared_expert())
    sparse = add(sparse, add(mul(3, mul(h, shared_expert_intermediate_size)), h));
  // Sparse and dense layers: counted apart (qwen2_moe mixes them), the layers up to a bound so
  // that a huge num_hidden_layers is an overflow below, not a long loop.
  int64_t n_sparse = is_moe() ? num_hidden_layers : 0;
  if (is_qwen2_moe() && num_hidden_layers <= kMaxModelLayers) {
    n_sparse = 0;
    for (int64_t i = 0; i < num_hidden_layers; ++i) n_sparse += layer_is_moe(i) ? 1 : 0;
  }
  const int64_t layers = add(mul(n_sparse, add(sparse, add(attn, mul(2, h)))),
                             mul(num_hidden_layers - n_sparse, add(dense, add(attn, mul(2, h)))));
  const int64_t embed = mul(mul(vocab_size, h), tie_word_embeddings ? 1 : 2);
  return add(add(layers, embed), h);
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& source) {
  if (!j.is_object()) fail("config", source, ": expected a JSON object");
  ModelConfig c;
  if (auto it = j.find("architectures");
      it != j.end() && it->is_array() && !it->empty() && (*it)[0].is_string())
    c.architecture = (*it)[0].get<std::string>();
  c.hidden_size = get_int(j, "hidden_size", source);
  c.intermediate_size = get_int(j, "intermediate_size", source);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", source);
  c.num_attention_heads = get_int(j, "num_attention_heads", source);
  c.num_key_value_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                              ? get_int(j, "num_key_value_heads", source)
                              : c.num_attention_heads;
  c.vocab_size = get_int(j, "vocab_size", source);
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    c.head_dim = get_int(j, "head_dim", source);
  } else if (c.num_attention_heads > 0) {
    if (c.hidden_size % c.num_attention_heads != 0)
      fail("config", source, ": hidden_size ", c.hidden_size,
           " is not divisible by num_attention_heads ", c.num_attention_heads);
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (j.contains("max_position_embeddings"))
    c.max_position_embeddings = get_int(j, "max_position_embeddings", source);
  if (j.contains("rms_norm_eps"))
    c.rms_norm_eps = get_num(j["rms_norm_eps"], "rms_norm_eps", source);
  if (j.contains("rope_theta")) c.rope_theta = get_num(j["rope_theta"], "rope_theta", source);
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    const json& rs = j["rope_scaling"];
    if (!rs.is_object())
      fail("config", source, ": field \"rope_scaling\" must be an object or null, got ",
           json_preview(rs));
    std::string type;
    for (const char* key : {"type", "rope_type"}) {
      auto t = rs.find(key);
      if (t == rs.end() || t->is_null()) continue;
      if (!t->is_string())
        fail("config", source, ": field \"rope_scaling.", key, "\" must be a string, got ",
             json_preview(*t));
      type = t->get<std::string>();
    }
    if (type == "llama3") {
      c.rope_scaling.type = type;
      c.rope_scaling.factor = get_num(require(rs, "factor", source), "rope_scaling.factor", source);
      if (rs.contains("low_freq_factor"))
        c.rope_scaling.low_freq_factor =
            get_num(rs["low_freq_factor"], "rope_scaling.low_freq_factor", source);
      if (rs.contains("high_freq_factor"))
        c.rope_scaling.high_freq_factor =
            get_num(rs["high_freq_factor"], "rope_scaling.high_freq_factor", source);
      if (rs.contains("original_max_position_embeddings"))
        c.rope_scaling.original_max_position_embeddings =
            as_int(rs["original_max_position_embeddings"],
                   "rope_scaling.original_max_position_embeddings", source);
    } else if (type != "default" && !type.empty()) {
      fail("config", source, ": rope_scaling type \"", type,
           "\" is not supported (supported: none, \"llama3\")");
    }
  }
  if (j.contains("tie_word_embeddings")) {
    if (!j["tie_word_embeddings"].is_boolean())
      fail("config", source, ": field \"tie_word_embeddings\" must be true or false");
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  if (j.contains("torch_dtype") && j["torch_dtype"].is_string())
    c.torch_dtype = j["torch_dtype"].get<std::string>();
  if (j.contains("bos_token_id") && !j["bos_token_id"].is_null())
    c.bos_token_id = as_int(j["bos_token_id"], "bos_token_id", source);
  if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) {
    const json& e = j["eos_token_id"];
    if (e.is_array()) {
      c.eos_token_ids.clear();
      for (size_t i = 0; i < e.size(); ++i)
        c.eos_token_ids.push_back(as_int(e[i], cat("eos_token_id[", i, "]"), source));
    } else {
      c.eos_token_ids = {as_int(e, "eos_token_id", source)};
    }
  }
  if (has(j, "model_type")) {
    if (!j["model_type"].is_string())
      fail("config", source, ": field \"model_type\" must be a string, got ",
           json_preview(j["model_type"]));
    c.model_type = j["model_type"].get<std::string>();
  }
  if (c.is_qwen2_moe()) {
    // Qwen2-MoE: q/k/v biases always; sparse blocks with a shared expert; HF's defaults.
    c.attention_bias = true;
    c.num_local_experts = get_int(j, "num_experts", source);
    c.num_experts_per_tok = get_int(j, "num_experts_per_tok", source);
    c.moe_intermediate_size = get_int(j, "moe_intermediate_size", source);
    c.shared_expert_intermediate_size = get_int(j, "shared_expert_intermediate_size", source);
    c.norm_topk_prob = has(j, "norm_topk_prob") ? get_bool(j, "norm_topk_prob", source) : false;
    if (has(j, "decoder_sparse_step"))
      c.decoder_sparse_step = get_int(j, "decoder_sparse_step", source);
    if (has(j, "mlp_only_layers")) {
      const json& m = j["mlp_only_layers"];
      if (!m.is_array())
        fail("config", source, ": field \"mlp_only_layers\" must be a list of layer indices, got ",
             json_preview(m));
      for (size_t i = 0; i < m.size(); ++i)
        c.mlp_only_layers.push_back(as_int(m[i], cat("mlp_only_layers[", i, "]"), source));
    }
    if (has(j, "use_sliding_window") && get_bool(j, "use_sliding_window", source))
      fail("config", source,
           ": use_sliding_window true (Qwen2 sliding-window attention) is not supported");
    if (c.num_local_experts <= 0)
      fail("config", source,
           ": field \"num_experts\" must be positive for model_type \"qwen2_moe\", got ",
           c.num_local_experts);
  } else {
    if (has(j, "num_local_experts")) c.num_local_experts = get_int(j, "num_local_experts", source);
    if (has(j, "num_experts_per_tok"))
      c.num_experts_per_tok = get_int(j, "num_experts_per_tok", source);
    // LLaMA's attention_bias puts a bias on o_proj too, and mlp_bias on the MLP: neither is
    // loaded, so a model that has them is refused rather than run without them.
    for (const char* field : {"attention_bias", "mlp_bias"})
      if (has(j, field) && get_bool(j, field, source))
        fail("config", source, ": ", field, " true is not supported for model_type \"",
             c.model_type, "\" (the biases would be ignored)");
  }
  if (c.is_moe() && j.contains("router_aux_loss_coef")) {
    c.router_aux_loss_coef =
        get_num(j["router_aux_loss_coef"], "router_aux_loss_coef", source);
    if (!(c.router_aux_loss_coef >= 0) || !std::isfinite(c.router_aux_loss_coef))
      fail("config", source, ": router_aux_loss_coef must be a finite number >= 0, got ",
           c.router_aux_loss_coef);
  }
  if (j.contains("rope_interleaved") && j["rope_interleaved"].is_boolean())
    c.rope_interleaved = j["rope_interleaved"].get<bool>();
  c.validate(source);
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  // A config.json is a few kB: the limit keeps /dev/zero-like inputs from reading without end.
  constexpr uint64_t kMaxConfigBytes = 16 << 20;
  return from_json(
      parse_json_text(read_text_file(path, kMaxConfigBytes, "config"), "config", path), path);
}

json ModelConfig::to_json() const {
  json j;
  j["architectures"] = {architecture};
  j["model_type"] = is_qwen2_moe() ? "qwen2_moe" : is_moe() ? "mixtral" : "llama";
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  if (head_dim * num_attention_heads != hidden_size) j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  if (rope_scaling.type.empty()) {
    j["rope_scaling"] = nullptr;
  } else {
    j["rope_scaling"] = {
        {"rope_type", rope_scaling.type},
        {"factor", rope_scaling.factor},
        {"low_freq_factor", rope_scaling.low_freq_factor},
        {"high_freq_factor", rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings}};
  }
  if (rope_interleaved) j["rope_interleaved"] = true;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = torch_dtype;
  j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1)
    j["eos_token_id"] = eos_token_ids[0];
  else
    j["eos_token_id"] = eos_token_ids;
  j["hidden_act"] = "silu";
  if (is_qwen2_moe()) {
    j["num_experts"] = num_local_experts;
    j["num_experts_per_tok"] = num_experts_per_tok;
    j["norm_topk_prob"] = norm_topk_prob;
    j["moe_intermediate_size"] = moe_intermediate_size;
    j["shared_expert_intermediate_size"] = shared_expert_intermediate_size;
    j["decoder_sparse_step"] = decoder_sparse_step;
    j["mlp_only_layers"] = mlp_only_layers;
    j["use_sliding_window"] = false;
    j["router_aux_loss_coef"] = router_aux_loss_coef;
  } else if (is_moe()) {
    j["num_local_experts"] = num_local_experts;
    j["num_experts_per_tok"] = num_experts_per_tok;
    j["router_aux_loss_coef"] = router_aux_loss_coef;
  }
  return j;
}

void ModelConfig::validate(const std::string& source) const {
  auto positive = [&](const char* field, int64_t v) {
    if (v <= 0) fail("config", source, ": field \"", field, "\" must be positive, got ", v);
  };
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  positive("vocab_size", vocab_size);
  positive("max_position_embeddings", max_position_embeddings);
  if (head_dim % 2 != 0) fail("config", source, ": head_dim ", head_dim, " must be even for RoPE");
  if (num_attention_heads % num_key_value_heads != 0)
    fail("config", source, ": num_attention_heads ", num_attention_heads,
         " is not divisible by num_key_value_heads ", num_key_value_heads);
  // NaN and infinities fail these too: each would turn every logit into NaN.
  auto finite_positive = [&](const char* field, double v) {
    if (!(std::isfinite(v) && v > 0))
      fail("config", source, ": field \"", field, "\" must be a finite positive number, got ", v);
  };
  finite_positive("rms_norm_eps", rms_norm_eps);
  finite_positive("rope_theta", rope_theta);
  if (!rope_scaling.type.empty()) {
    finite_positive("rope_scaling.factor", rope_scaling.factor);
    finite_positive("rope_scaling.low_freq_factor", rope_scaling.low_freq_factor);
    finite_positive("rope_scaling.high_freq_factor", rope_scaling.high_freq_factor);
    // The llama3 blend divides by their difference.
    if (!(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor))
      fail("config", source, ": field \"rope_scaling.high_freq_factor\" (",
           rope_scaling.high_freq_factor, ") must be above rope_scaling.low_freq_factor (",
           rope_scaling.low_freq_factor, ")");
    positive("rope_scaling.original_max_position_embeddings",
             rope_scaling.original_max_position_embeddings);
  }
  if (num_local_experts < 0)
    fail("config", source, ": field \"num_local_experts\" must not be negative, got ",
         num_local_experts);
  if (is_moe() && (num_experts_per_tok <= 0 || num_experts_per_tok > num_local_experts))
    fail("config", source, ": num_experts_per_tok ", num_experts_per_tok, " must be in 1..",
         num_local_experts);
  if (is_qwen2_moe()) {
    positive("moe_intermediate_size", moe_intermediate_size);
    if (shared_expert_intermediate_size < 0)
      fail("config", source,
           ": field \"shared_expert_intermediate_size\" must not be negative, got ",
           shared_expert_intermediate_size);
    if (decoder_sparse_step < 1)
      fail("config", source, ": field \"decoder_sparse_step\" must be at least 1, got ",
           decoder_sparse_step);
    for (size_t i = 0; i < mlp_only_layers.size(); ++i)
      if (mlp_only_layers[i] < 0 || mlp_only_layers[i] >= num_hidden_layers)
        fail("config", source, ": field \"mlp_only_layers[", i, "]\" = ", mlp_only_layers[i],
             " is not a layer in [0, num_hidden_layers ", num_hidden_layers, ")");
  }
  if (bos_token_id >= vocab_size)
    fail("config", source, ": bos_token_id ", bos_token_id, " is not below vocab_size ",
         vocab_size);
  for (size_t i = 0; i < eos_token_ids.size(); ++i)
    if (eos_token_ids[i] < 0 || eos_token_ids[i] >= vocab_size)
      fail("config", source, ": field \"eos_token_id",
           eos_token_ids.size() > 1 ? cat("[", i, "]") : "", "\" = ", eos_token_ids[i],
           " is not in [0, vocab_size ", vocab_size, ")");
  // Every product of sizes the model uses must fit: the parameter count bounds them all.
  try {
    (void)param_count();
  } catch (const std::invalid_argument&) {
    fail("config", source, ": the sizes (hidden_size ", hidden_size, ", intermediate_size ",
         intermediate_size, ", num_hidden_layers ", num_hidden_layers, ", vocab_size ", vocab_size,
         ") make a parameter count that overflows 64 bits");
  }
  // After the parameter count, so that sizes that overflow are named as such.
  if (num_hidden_layers > kMaxModelLayers)
    fail("config", source, ": num_hidden_layers ", num_hidden_layers, " is more than the ",
         kMaxModelLayers, " layers a model may have");
  if (num_local_experts > kMaxModelExperts)
    fail("config", source, ": num_local_experts ", num_local_experts, " is more than the ",
         kMaxModelExperts, " experts a model may have");
  // Attention and norms take 6 tensors a layer (9 with biases), the MLP 3 per expert (and a
  // router, and a shared expert with its gate).
  if (num_hidden_layers *
          ((is_qwen2_moe() ? 14 : 7) + 3 * std::max<int64_t>(num_local_experts, 1)) >
      kMaxModelTensors)
    fail("config", source, ": num_hidden_layers ", num_hidden_layers, " x num_local_experts ",
         num_local_experts, " is more than the ", kMaxModelTensors, " tensors a model may have");
}

std::vector<float> ModelConfig::rope_inv_freq() const {
  const int64_t half = head_dim / 2;
  std::vector<float> f(half);
  for (int64_t i = 0; i < half; ++i) {
    double inv =
        1.0 / std::pow(rope_theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
    if (rope_scaling.type == "llama3") {
      // Meta's Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
      // blend between low_freq_factor and high_freq_factor.
      const double old_ctx = static_cast<double>(rope_scaling.original_max_position_embeddings);
      const double low_wavelen = old_ctx / rope_scaling.low_freq_factor;
      const double high_wavelen = old_ctx / rope_scaling.high_freq_factor;
      const double wavelen = 2.0 * M_PI / inv;
      if (wavelen > low_wavelen) {
        inv = inv / rope_scaling.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_ctx / wavelen - rope_scaling.low_freq_factor) /
                              (rope_scaling.high_freq_factor - rope_scaling.low_freq_factor);
        inv = (1.0 - smooth) * inv / rope_scaling.factor + smooth * inv;
      }
    }
    f[i] = static_cast<float>(inv);
  }
  return f;
}

}  // namespace parallm
