// ModelConfig: the shape of a LLaMA-family model, read from a Hugging Face config.json (LLaMA,
// Mistral, TinyLlama, Mixtral, Qwen2-MoE field names) or filled in by a checkpoint reader.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace parallm {

struct RopeScaling {
  std::string type;  // "" (none) or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// Bounds on what a config may describe, far above any real model (the deepest have ~130 layers,
// the widest MoE a few hundred experts): every loader lists the tensors a config implies before it
// reads a byte of weights, so without them a tiny header (a llama2.c file, a config.json) could
// ask for billions of entries.
constexpr int64_t kMaxModelLayers = int64_t{1} << 14;
constexpr int64_t kMaxModelExperts = int64_t{1} << 16;
constexpr int64_t kMaxModelTensors = int64_t{1} << 20;  // layers x tensors per layer

struct ModelConfig {
  std::string architecture = "LlamaForCausalLM";
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_attention_heads unless config.json says otherwise
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool rope_interleaved = false;  // true for Meta/llama2.c checkpoints, false for Hugging Face
  bool tie_word_embeddings = false;
  std::string torch_dtype = "float32";
  int64_t bos_token_id = 1;
  std::vector<int64_t> eos_token_ids = {2};
  // config.json's model_type: "llama" unless it says otherwise; "mixtral" and "qwen2_moe" change
  // the tensor names and the MoE block (docs/moe.md).
  std::string model_type = "llama";
  // Mixture of experts (Mixtral; qwen2_moe's num_experts): 0 experts means a dense MLP.
  int64_t num_local_experts = 0;
  int64_t num_experts_per_tok = 0;
  bool norm_topk_prob = true;  // the top-k weights renormalised to sum to 1 (Mixtral: always)
  // Training: the weight of the load-balancing auxiliary loss (Hugging Face's default 0.001; 0
  // turns it off). Not used by inference.
  double router_aux_loss_coef = 0.001;
  // qwen2_moe: the experts' FFN width, the shared expert's (0: none), which layers are sparse
  // (layer i when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers; the others
  // are dense MLPs of intermediate_size), and the q/k/v projections' biases.
  int64_t moe_intermediate_size = 0;
  int64_t shared_expert_intermediate_size = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool attention_bias = false;  // q_proj, k_proj, v_proj have .bias (o_proj none), as Qwen2

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  bool is_moe() const { return num_local_experts > 0; }
  bool is_qwen2_moe() const { return model_type == "qwen2_moe"; }
  // Whether decoder layer `layer` is a sparse MoE block (else a dense MLP).
  bool layer_is_moe(int64_t layer) const;
  // Each expert's FFN width: moe_intermediate_size for qwen2_moe, intermediate_size for Mixtral.
  int64_t expert_ffn() const { return is_qwen2_moe() ? moe_intermediate_size : intermediate_size; }
  bool has_shared_expert() const { return is_moe() && shared_expert_intermediate_size > 0; }

  // Parameters in the model (embeddings once when tied; all experts for MoE).
  int64_t param_count() const;

  // Parses a config.json object; `source` names it in errors. Validates (see validate()).
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
  static ModelConfig from_file(const std::string& path);
  nlohmann::json to_json() const;

  // Throws std::invalid_argument naming `source`, the field and its value when a field is
  // impossible (non-positive sizes, heads not dividing hidden_size, KV heads not dividing
  // heads...).
  void validate(const std::string& source) const;

  // RoPE inverse frequencies, head_dim / 2 of them, with rope_scaling applied.
  std::vector<float> rope_inv_freq() const;
};

}  // namespace parallm
