#include "parallm/train/model.h"

#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/core/error.h"
#include "parallm/parallel/attention.h"
#include "parallm/parallel/embedding.h"
#include "parallm/parallel/lm_head.h"
#include "parallm/parallel/mlp.h"
#include "parallm/parallel/shard.h"
#include "parallm/kernels/backward.h"
#include "parallm/parallel/cross_entropy.h"

namespace parallm::train {
namespace {

// A layer's parameters, by role.
struct LayerParams {
  const Param* in_norm = nullptr;
  const Param* q = nullptr;
  const Param* k = nullptr;
  const Param* v = nullptr;
  const Param* o = nullptr;
  const Param* post_norm = nullptr;
  const Param* gate = nullptr;
  const Param* up = nullptr;
  const Param* down = nullptr;
};

// What one layer's forward keeps for its backward.
struct LayerState {
  std::vector<float> x;           // [T, H] the layer's input (the residual stream)
  std::vector<float> xn1, rstd1;  // input_layernorm's output [T, H] and 1/rms [T]
  std::vector<float> x2;          // [T, H] after the attention's residual
  std::vector<float> xn2, rstd2;  // post_attention_layernorm's
  parallel::AttentionCache attn;
  parallel::MlpCache mlp;
};

void resize(std::vector<float>& v, int64_t n) {
  v.resize(static_cast<size_t>(n));
}

}  // namespace

struct TrainModel::Impl {
  ModelConfig config;
  ParamStore& params;
  comm::Group tp;
  TrainModelOptions options;
  parallel::ShardSpec vocab;
  // BF16 compute: the matrices rounded to bf16 and held as f32 (the same layout as the masters),
  // so the forward and the input-gradient products see bf16 weights; F32: unused, the layers
  // view the masters.
  Tensor compute;

  const Param* embed_p = nullptr;
  const Param* norm_p = nullptr;
  const Param* head_p = nullptr;  // the embedding when tied
  std::vector<LayerParams> lp;

  parallel::VocabParallelEmbedding embed;
  std::vector<parallel::ParallelAttention> attn;
  std::vector<parallel::ParallelMlp> mlp;
  parallel::VocabParallelLmHead head;

  std::vector<LayerState> st;
  // The layers' backward scratch, lent to the layer being differentiated (swapped in and out of
  // its cache), so only one layer's worth exists.
  parallel::AttentionCache attn_scratch;
  parallel::MlpCache mlp_scratch;
  std::vector<float> xlast, xf, rstdf, logits, dlogits, tmp, dx, dxn;
  GradReadyHook hook;

  Impl(const ModelConfig& c, ParamStore& p, comm::Group g, TrainModelOptions o)
      : config(c), params(p), tp(std::move(g)), options(o) {}

  float* weights_base() {
    return options.compute == DType::F32 ? params.values() : compute.data<float>();
  }
  Tensor view(const Param& p, Shape shape) {
    return Tensor::borrow(weights_base() + p.offset, DType::F32, std::move(shape));
  }
  const float* value(const Param* p) { return params.value(*p); }
  float* grad(const Param* p) { return params.grad(*p); }
  void ready(const Param* p) {
    if (hook) hook(*p);
  }

  void lend_scratch(LayerState& s) {
    std::swap(s.attn.dattn, attn_scratch.dattn), std::swap(s.attn.dq, attn_scratch.dq);
    std::swap(s.attn.dk, attn_scratch.dk), std::swap(s.attn.dv, attn_scratch.dv);
    std::swap(s.mlp.dh, mlp_scratch.dh), std::swap(s.mlp.dgu, mlp_scratch.dgu);
  }
  void build();
  double run(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S, float grad_scale,
             bool backward);
};

void TrainModel::Impl::build() {
  const ModelConfig& c = config;
  const int size = tp.size(), rank = tp.rank();
  if (params.tp() != size || params.tp_rank() != rank)
    fail("train", "parameters laid out for TP rank ", params.tp_rank(), " of ", params.tp(),
         " given to TP rank ", rank, " of ", size);
  if (options.compute != DType::F32 && options.compute != DType::BF16)
    fail("train", "compute dtype ", dtype_name(options.compute), " is not supported (f32, bf16)");
  if (options.compute == DType::BF16) {
    compute = Tensor::zeros(DType::F32, {params.size()});
  }
  const parallel::HeadPlan heads =
      parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, size, rank);
  const parallel::ShardSpec ffn = parallel::ShardSpec::even(c.intermediate_size, size, rank);
  vocab = parallel::ShardSpec::even(c.vocab_size, size, rank);
  const int64_t H = c.hidden_size, hd = c.head_dim;

  embed_p = &params.find(names::kEmbed);
  norm_p = &params.find(names::kNorm);
  head_p = c.tie_word_embeddings ? embed_p : &params.find(names::kLmHead);
  parallel::RopeSpec rope{c.rope_inv_freq(), c.rope_interleaved ? kernels::RopeStyle::Interleaved
                                                                : kernels::RopeStyle::HalfSplit};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto f = [&](const char* suffix) { return &params.find(names::layer(l, suffix)); };
    LayerParams p{f("input_layernorm.weight"),  f("self_attn.q_proj.weight"),
                  f("self_attn.k_proj.weight"), f("self_attn.v_proj.weight"),
                  f("self_attn.o_proj.weight"), f("post_attention_layernorm.weight"),
                  f("mlp.gate_proj.weight"),    f("mlp.up_proj.weight"),
                  f("mlp.down_proj.weight")};
    // The fused layers view q|k|v and gate|up as one matrix: params.h keeps each group contiguous.
    if (p.k->offset != p.q->offset + p.q->numel || p.v->offset != p.k->offset + p.k->numel ||
        p.up->offset != p.gate->offset + p.gate->numel)
      fail("train", "layer ", l, ": q/k/v or gate/up are not contiguous in the parameter buffer");
    const int64_t qkv_rows = p.q->local_shape[0] + p.k->local_shape[0] + p.v->local_shape[0];
    attn.emplace_back(view(*p.q, {qkv_rows, H}), view(*p.o, p.o->local_shape), heads, hd, rope, tp);
    mlp.emplace_back(view(*p.gate, {2 * ffn.size(), H}), view(*p.down, p.down->local_shape), ffn,
                     tp);
    lp.push_back(p);
  }
  embed = parallel::VocabParallelEmbedding(view(*embed_p, embed_p->local_shape), vocab, tp);
  head = parallel::VocabParallelLmHead(view(*head_p, head_p->local_shape), vocab, tp);
  st.resize(static_cast<size_t>(c.num_hidden_layers));
}

double TrainModel::Impl::run(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S,
                             float grad_scale, bool backward) {
  const ModelConfig& c = config;
  if (B <= 0 || S <= 0)
    fail("train", "a micro-batch needs B >= 1 and S >= 1, got B ", B, ", S ", S);
  const int64_t T = B * S, H = c.hidden_size, L = c.num_hidden_layers, V = c.vocab_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  // Checked before any collective, on every rank alike (all ranks see the same ids).
  for (int64_t t = 0; t < T; ++t) {
    if (inputs[t] < 0 || inputs[t] >= V)
      fail("train", "input token id ", inputs[t], " at position ", t,
           " is outside the vocabulary [0, ", V, ")");
    if (targets[t] < 0 || targets[t] >= V)
      fail("train", "target token id ", targets[t], " at position ", t,
           " is outside the vocabulary [0, ", V, ")");
  }
  if (T * H > (int64_t{1} << 40)) fail("train", "micro-batch of ", T, " tokens is too large");
  for (LayerState& s : st) {
    resize(s.x, T * H), resize(s.xn1, T * H), resize(s.x2, T * H), resize(s.xn2, T * H);
    resize(s.rstd1, T), resize(s.rstd2, T);
  }
  resize(xlast, T * H), resize(xf, T * H), resize(rstdf, T), resize(tmp, T * H);
  resize(logits, T * vocab.size());

  // ---- forward ----
  float* x0 = L > 0 ? st[0].x.data() : xlast.data();
  embed.forward(inputs, T, x0);
  for (int64_t l = 0; l < L; ++l) {
    LayerState& s = st[l];
    const LayerParams& p = lp[l];
    kernels::rmsnorm_forward(s.x.data(), value(p.in_norm), T, H, eps, s.xn1.data(), s.rstd1.data());
    attn[l].forward_train(s.xn1.data(), B, S, s.attn, tmp.data());
    for (int64_t i = 0; i < T * H; ++i) s.x2[i] = s.x[i] + tmp[i];
    kernels::rmsnorm_forward(s.x2.data(), value(p.post_norm), T, H, eps, s.xn2.data(), s.rstd2.data());
    mlp[l].forward_train(s.xn2.data(), T, s.mlp, tmp.data());
    float* next = l + 1 < L ? st[l + 1].x.data() : xlast.data();
    for (int64_t i = 0; i < T * H; ++i) next[i] = s.x2[i] + tmp[i];
  }
  kernels::rmsnorm_forward(xlast.data(), value(norm_p), T, H, eps, xf.data(), rstdf.data());
  head.forward(xf.data(), T, logits.data());
  if (backward) resize(dlogits, T * vocab.size());
  const double loss = parallel::cross_entropy(head.exchange(), logits.data(), T, vocab.size(), vocab.begin,
                                    targets, grad_scale, backward ? dlogits.data() : nullptr);
  if (!backward) return loss;

  // ---- backward: dx is the gradient of the residual stream, dxn of a norm's output ----
  resize(dx, T * H), resize(dxn, T * H);
  head.backward(xf.data(), dlogits.data(), T, dxn.data(), grad(head_p));  // all-reduces dxn
  if (head_p != embed_p) ready(head_p);
  kernels::rmsnorm_backward(xlast.data(), value(norm_p), rstdf.data(), dxn.data(), T, H, dx.data(),
                   grad(norm_p), false);
  ready(norm_p);
  for (int64_t l = L - 1; l >= 0; --l) {
    LayerState& s = st[l];
    const LayerParams& p = lp[l];
    lend_scratch(s);
    mlp[l].backward(s.xn2.data(), s.mlp, dx.data(), T, dxn.data(), grad(p.gate), grad(p.down));
    ready(p.down), ready(p.gate), ready(p.up);
    kernels::rmsnorm_backward(s.x2.data(), value(p.post_norm), s.rstd2.data(), dxn.data(), T, H, dx.data(),
                     grad(p.post_norm), true);
    ready(p.post_norm);
    attn[l].backward(s.xn1.data(), s.attn, dx.data(), B, S, dxn.data(), grad(p.q), grad(p.o));
    ready(p.o), ready(p.q), ready(p.k), ready(p.v);
    kernels::rmsnorm_backward(s.x.data(), value(p.in_norm), s.rstd1.data(), dxn.data(), T, H, dx.data(),
                     grad(p.in_norm), true);
    lend_scratch(s);  // back
    ready(p.in_norm);
  }
  embed.backward(inputs, T, dx.data(), grad(embed_p));
  ready(embed_p);
  return loss;
}

TrainModel::TrainModel(const ModelConfig& config, ParamStore& params, comm::Group tp,
                       TrainModelOptions options)
    : impl_(std::make_unique<Impl>(config, params, std::move(tp), options)) {
  impl_->build();
  refresh_compute_weights();
}

TrainModel::~TrainModel() = default;

const ModelConfig& TrainModel::config() const {
  return impl_->config;
}
ParamStore& TrainModel::params() {
  return impl_->params;
}

double TrainModel::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B,
                                    int64_t S, float grad_scale) {
  return impl_->run(inputs, targets, B, S, grad_scale, true);
}

double TrainModel::loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S) {
  return impl_->run(inputs, targets, B, S, 1.0f, false);
}

void TrainModel::set_grad_ready_hook(GradReadyHook hook) {
  impl_->hook = std::move(hook);
}

void TrainModel::refresh_compute_weights() {
  Impl& m = *impl_;
  if (m.options.compute == DType::F32) return;
  // Matrices rounded to bf16 (round to nearest even, as convert() does); norm weights exact.
  std::vector<uint16_t> b16;
  float* dst = m.compute.data<float>();
  for (const Param& p : m.params.params()) {
    const float* src = m.params.value(p);
    if (!p.tensor.matrix) {
      std::memcpy(dst + p.offset, src, static_cast<size_t>(p.numel) * sizeof(float));
      continue;
    }
    b16.resize(static_cast<size_t>(p.numel));
    convert(src, DType::F32, b16.data(), DType::BF16, b16.size());
    convert(b16.data(), DType::BF16, dst + p.offset, DType::F32, b16.size());
  }
}

// ---- gather_full_tensors ----

namespace {

// Places the slice `p` of rank data `src` (its flat buffer) into the full tensor `full`.
void place(const Param& p, const float* src, Tensor& full) {
  float* dst = full.data<float>();
  const float* s = src + p.offset;
  const Shape& shape = p.tensor.shape;
  switch (p.slice.kind) {
    case Slice::Kind::All:
      std::memcpy(dst, s, static_cast<size_t>(p.numel) * sizeof(float));
      break;
    case Slice::Kind::Rows: {
      const int64_t row = p.tensor.numel() / shape.at(0);
      std::memcpy(dst + p.slice.begin * row, s, static_cast<size_t>(p.numel) * sizeof(float));
      break;
    }
    case Slice::Kind::Cols: {
      const int64_t cols = shape.at(1), w = p.slice.end - p.slice.begin;
      for (int64_t r = 0; r < shape.at(0); ++r)
        std::memcpy(dst + r * cols + p.slice.begin, s + r * w,
                    static_cast<size_t>(w) * sizeof(float));
      break;
    }
  }
}

}  // namespace

std::vector<std::pair<std::string, Tensor>> gather_full_tensors(const ParamStore& params,
                                                                const comm::Group& tp, bool grads) {
  if (params.tp() != tp.size() || params.tp_rank() != tp.rank())
    fail("train", "gather_full_tensors: parameters laid out for TP rank ", params.tp_rank(), " of ",
         params.tp(), " given to TP rank ", tp.rank(), " of ", tp.size());
  const float* mine = grads ? params.grads() : params.values();
  std::vector<std::string> all;
  if (tp.size() > 1) {
    // One gather of each rank's whole flat buffer; rank 0 cuts the slices out by each rank's
    // layout (param_layout), so every shard rule, uneven splits and replicated K/V included,
    // lands where llama_tensor_slice says.
    all = comm::gather_strings(tp, std::string(reinterpret_cast<const char*>(mine),
                                               static_cast<size_t>(params.size()) * sizeof(float)));
    if (tp.rank() != 0) return {};
  }
  std::vector<std::vector<Param>> layouts(static_cast<size_t>(tp.size()));
  std::vector<const float*> data(static_cast<size_t>(tp.size()));
  layouts[0] = params.params();
  data[0] = mine;
  for (int r = 1; r < tp.size(); ++r) {
    int64_t size = 0;
    layouts[r] = param_layout(params.config(), tp.size(), r, &size);
    if (all[r].size() != static_cast<size_t>(size) * sizeof(float))
      fail("train", "gather_full_tensors: TP rank ", r, " sent ", all[r].size(),
           " bytes, its layout holds ", size * 4);
    data[r] = reinterpret_cast<const float*>(all[r].data());
  }
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < params.params().size(); ++i) {
    const Param& p0 = params.params()[i];
    Tensor full = Tensor::zeros(DType::F32, p0.tensor.shape);
    if (p0.slice.kind == Slice::Kind::All) {
      place(p0, data[0], full);
    } else {
      for (int r = 0; r < tp.size(); ++r) place(layouts[r][i], data[r], full);
    }
    out.emplace_back(p0.tensor.name, std::move(full));
  }
  return out;
}

// ---- init_params ----

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in (0, 1], 53 bits, from a counter.
double uniform(uint64_t key, uint64_t counter) {
  return (static_cast<double>(splitmix64(key ^ splitmix64(counter)) >> 11) + 1.0) * 0x1.0p-53;
}

// Element j of a standard normal stream keyed by `key`: Box-Muller on pair j/2, cos for even j,
// sin for odd j. Counter-based, so any slice of a tensor is drawn without drawing the rest.
double normal(uint64_t key, uint64_t j) {
  const uint64_t pair = j / 2;
  const double r = std::sqrt(-2.0 * std::log(uniform(key, 2 * pair)));
  const double a = 2.0 * M_PI * uniform(key, 2 * pair + 1);
  return r * (j % 2 == 0 ? std::cos(a) : std::sin(a));
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

void init_params(ParamStore& params, const ModelConfig& config, uint64_t seed) {
  const std::vector<LlamaTensor> tensors = llama_tensors(config);
  const double small = 0.02 / std::sqrt(2.0 * static_cast<double>(config.num_hidden_layers));
  for (const Param& p : params.params()) {
    size_t index = 0;
    while (index < tensors.size() && tensors[index].name != p.tensor.name) ++index;
    if (index == tensors.size())
      fail("train", "init_params: tensor \"", p.tensor.name, "\" is not in the model's table");
    float* dst = params.value(p);
    if (!p.tensor.matrix) {
      for (int64_t i = 0; i < p.numel; ++i) dst[i] = 1.0f;
      continue;
    }
    const double std =
        ends_with(p.tensor.name, "o_proj.weight") || ends_with(p.tensor.name, "down_proj.weight")
            ? small
            : 0.02;
    const uint64_t key = splitmix64(seed) ^ splitmix64(0x5eed0000ULL + index);
    const int64_t rows = p.local_shape.at(0),
                  cols = p.local_shape.size() > 1 ? p.local_shape[1] : 1;
    const int64_t full_cols = p.tensor.shape.size() > 1 ? p.tensor.shape[1] : 1;
    const int64_t r0 = p.slice.kind == Slice::Kind::Rows ? p.slice.begin : 0;
    const int64_t c0 = p.slice.kind == Slice::Kind::Cols ? p.slice.begin : 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t cc = 0; cc < cols; ++cc)
        dst[r * cols + cc] = static_cast<float>(
            std * normal(key, static_cast<uint64_t>((r0 + r) * full_cols + c0 + cc)));
  }
}

}  // namespace parallm::train
