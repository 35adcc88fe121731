#include "parallm/train/params.h"

#include <algorithm>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/parallel/shard.h"

namespace parallm::train {
namespace {

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// Whether `t` continues a fused group started by the tensor before it (q|k|v, gate|up): it then
// follows that tensor with no padding, so the fused layer views the group as one matrix.
bool continues_fused_group(const LlamaTensor& t) {
  return ends_with(t.name, "self_attn.k_proj.weight") ||
         ends_with(t.name, "self_attn.v_proj.weight") || ends_with(t.name, "mlp.up_proj.weight");
}

Shape slice_shape(const LlamaTensor& t, const Slice& s) {
  Shape shape = t.shape;
  if (s.kind == Slice::Kind::Rows) shape.at(0) = s.end - s.begin;
  if (s.kind == Slice::Kind::Cols) shape.at(1) = s.end - s.begin;
  return shape;
}

// Whether the stage holds `t`: its layers' tensors, the embedding on the first stage, the final
// norm and the LM head on the last (with tied embeddings the last stage's head is the embedding).
bool stage_holds(const StageTensors& stage, const LlamaTensor& t, bool tied) {
  if (t.layer >= 0) return stage.holds_layer(t.layer);
  if (t.part == LlamaPart::Embedding) return stage.embedding || (tied && stage.head);
  return stage.head;  // the final norm, the untied lm_head
}

}  // namespace

bool StageTensors::holds_layer(int64_t layer) const {
  if (layers.empty()) return true;
  for (const pipeline::StageLayers& r : layers)
    if (layer >= r.begin && layer < r.end) return true;
  return false;
}

std::vector<Param> param_layout(const ModelConfig& config, int tp, int tp_rank, int64_t* size,
                                const StageTensors& stage, int ep, int ep_rank) {
  if (config.is_qwen2_moe())
    fail("train",
         "model_type qwen2_moe cannot be trained (its shared expert and q/k/v biases "
         "have no backward here); Mixtral-style models can");
  if (std::string p = llama_tp_problem(config, tp); !p.empty()) fail("train", p);
  const parallel::HeadPlan heads =
      parallel::HeadPlan::make(config.num_attention_heads, config.num_key_value_heads, tp, tp_rank);
  std::vector<Param> out;
  int64_t offset = 0;
  for (const pipeline::StageLayers& r : stage.layers)
    if (r.begin < 0 || r.end > config.num_hidden_layers || r.begin >= r.end)
      fail("train", "stage layer range [", r.begin, ", ", r.end,
           ") is not a non-empty range of the ", config.num_hidden_layers, " layers");
  const bool tied = config.tie_word_embeddings;
  parallel::ShardSpec experts{0, 0};
  if (config.is_moe()) {
    experts = parallel::expert_range(config.num_local_experts, ep, ep_rank);
  } else if (ep != 1 || ep_rank != 0) {
    fail("train", "expert parallelism (EP ", ep, ") needs a mixture-of-experts model");
  }
  // Two passes: everything but the experts, then the experts (one range at the end).
  std::vector<LlamaTensor> table = llama_tensors(config);
  std::vector<LlamaTensor> ordered;
  for (const LlamaTensor& t : table)
    if (t.part != LlamaPart::Expert) ordered.push_back(t);
  for (const LlamaTensor& t : table)
    if (t.part == LlamaPart::Expert && t.expert >= experts.begin && t.expert < experts.end)
      ordered.push_back(t);
  for (LlamaTensor& t : ordered) {
    if (!stage_holds(stage, t, tied)) continue;
    Param p;
    p.slice = llama_tensor_slice(t, config, tp, tp_rank);
    p.local_shape = slice_shape(t, p.slice);
    p.numel = llama_slice_numel(t, p.slice);
    if (!continues_fused_group(t)) offset = (offset + 15) / 16 * 16;
    p.offset = offset;
    offset += p.numel;
    p.decay = t.shape.size() == 2;
    const bool kv_replicated = t.rule == ShardRule::KvHeadRows && heads.kv_replicas > 1;
    p.tp_replicated = t.rule == ShardRule::Replicated || kv_replicated;
    p.tp_replicas = t.rule == ShardRule::Replicated ? tp : kv_replicated ? heads.kv_replicas : 1;
    // The head stage's copy of a tied embedding that another stage holds as the embedding.
    p.tied_copy = t.part == LlamaPart::Embedding && !stage.embedding;
    p.expert = t.part == LlamaPart::Expert;
    p.tensor = std::move(t);
    out.push_back(std::move(p));
  }
  if (size != nullptr) *size = (offset + 15) / 16 * 16;
  return out;
}

ParamStore::ParamStore(const ModelConfig& config, int tp, int tp_rank, const StageTensors& stage,
                       int ep, int ep_rank)
    : config_(config), tp_(tp), tp_rank_(tp_rank), ep_(ep), ep_rank_(ep_rank), stage_(stage) {
  params_ = param_layout(config, tp, tp_rank, &size_, stage, ep, ep_rank);
  expert_begin_ = size_;
  for (const Param& p : params_)
    if (p.expert) {
      expert_begin_ = p.offset;
      break;
    }
  values_ = Tensor::zeros(DType::F32, {size_});
  grads_ = Tensor::zeros(DType::F32, {size_});
}

const Param& ParamStore::find(const std::string& name) const {
  for (const Param& p : params_)
    if (p.tensor.name == name) return p;
  fail("train", "no parameter named \"", name, "\" in this model (", params_.size(),
       " parameters)");
}

void ParamStore::zero_grads() {
  if (size_ > 0) std::memset(grads(), 0, static_cast<size_t>(size_) * sizeof(float));
}

void ParamStore::load(const WeightSource& source) {
  for (const Param& p : params_) {
    const Tensor t = source.read(p.tensor.name, DType::F32, p.slice);
    if (t.numel() != p.numel)
      fail("train", source.describe(), ": tensor \"", p.tensor.name, "\" slice holds ", t.numel(),
           " values, expected ", p.numel, " (", shape_str(p.local_shape), ")");
    const Tensor c = t.is_contiguous() ? t : t.contiguous();
    std::memcpy(value(p), c.data<float>(), static_cast<size_t>(p.numel) * sizeof(float));
  }
}

}  // namespace parallm::train
