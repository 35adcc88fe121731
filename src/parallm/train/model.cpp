#include "parallm/train/model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/core/error.h"
#include "parallm/kernels/backward.h"
#include "parallm/parallel/attention.h"
#include "parallm/parallel/cross_entropy.h"
#include "parallm/parallel/embedding.h"
#include "parallm/parallel/lm_head.h"
#include "parallm/parallel/mappings.h"
#include "parallm/parallel/mlp.h"
#include "parallm/parallel/moe.h"
#include "parallm/parallel/shard.h"

namespace parallm::train {

TrainModelOptions pipeline_chunks(TrainModelOptions base,
                                  const std::vector<pipeline::StageLayers>& virtual_stages, int pp,
                                  int pp_rank, int v) {
  if (pp < 1 || v < 1 || pp_rank < 0 || pp_rank >= pp)
    fail("train", "pipeline_chunks: rank ", pp_rank, " of ", pp, " stages with ", v,
         " chunks each is not a pipeline position");
  if (virtual_stages.size() != static_cast<size_t>(pp) * static_cast<size_t>(v))
    fail("train", "pipeline_chunks: ", virtual_stages.size(), " layer ranges for ", pp,
         " stages x ", v, " chunks (needs ", pp * v, ")");
  base.chunks.clear();
  for (int c = 0; c < v; ++c) base.chunks.push_back(virtual_stages[c * pp + pp_rank]);
  base.has_embedding = pp_rank == 0;     // virtual stage 0 is chunk 0 of rank 0
  base.has_head = pp_rank == pp - 1;     // virtual stage pp*v-1 is chunk v-1 of rank pp-1
  return base;
}

StageTensors stage_tensors(const TrainModelOptions& options) {
  return StageTensors{options.chunks, options.has_embedding, options.has_head};
}

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
  // MoE layers (gate/up/down null): the router and this EP rank's experts' w1, w2, w3.
  const Param* router = nullptr;
  std::vector<const Param*> w1, w2, w3;
  bool moe() const { return router != nullptr; }
};

void resize(std::vector<float>& v, int64_t n) {
  v.resize(static_cast<size_t>(n));
}

// What one layer keeps for its backward. R = this rank's rows (T, or T's share under SP). Under
// full recomputation a held state fills only x; the rest lives in the model's one rerun scratch
// while the layer's forward runs again. Between ZB's B and W it keeps only what W needs.
struct LayerState {
  std::vector<float> x;           // [R, H] the layer's input (the residual stream)
  std::vector<float> xn1, rstd1;  // input_layernorm's output [R, H] and 1/rms [R]
  std::vector<float> x2;          // [R, H] after the attention's residual
  std::vector<float> xn2, rstd2;  // post_attention_layernorm's
  parallel::AttentionCache attn;  // its scratch is lent (Impl::lend_scratch), never held
  parallel::MlpCache mlp;
  parallel::MoeCache moe;

  // Floats of the vectors counted as held activations (model.h's ActivationStats).
  int64_t floats() const {
    return static_cast<int64_t>(
        x.size() + xn1.size() + rstd1.size() + x2.size() + xn2.size() + rstd2.size() +
        attn.q.size() + attn.k.size() + attn.v.size() + attn.probs.size() + attn.attn.size() +
        attn.wgrad_dqkv.size() + attn.wgrad_dout.size() + mlp.gu.size() + mlp.h.size() +
        mlp.wgrad_dgu.size() + mlp.wgrad_dout.size()) + moe.floats();
  }
  // After ZB's B: drop what only B needed (sizes to 0, capacity kept for the next micro-batch).
  void keep_for_weights() {
    x.clear(), rstd1.clear(), x2.clear(), rstd2.clear();
    attn.q.clear(), attn.k.clear(), attn.v.clear(), attn.probs.clear(), mlp.gu.clear();
  }
  // Full recomputation with ZB: what W needs moves from the rerun scratch into the held state.
  void take_weight_inputs(LayerState& from) {
    std::swap(xn1, from.xn1), std::swap(xn2, from.xn2), std::swap(attn.attn, from.attn.attn);
    std::swap(attn.wgrad_dqkv, from.attn.wgrad_dqkv);
    std::swap(attn.wgrad_dout, from.attn.wgrad_dout);
    std::swap(mlp.h, from.mlp.h), std::swap(mlp.wgrad_dgu, from.mlp.wgrad_dgu);
    std::swap(mlp.wgrad_dout, from.mlp.wgrad_dout);
  }
};

// Everything (micro-batch, chunk) keeps from its forward to its backward (or ZB's W).
struct ChunkState {
  int mb = 0, chunk = 0;
  int64_t B = 0, S = 0;
  bool input_done = false;         // ZB: backward_input ran, backward_weight is next
  std::vector<int32_t> ids;        // the embedding's chunk: the inputs, for its backward
  std::vector<LayerState> layers;  // one per layer of the chunk
  std::vector<float> xlast, xf, rstdf;  // the head's chunk: the final norm's input, output, 1/rms
  std::vector<float> dlogits;           // the head's chunk: [T, V_local], computed in the forward
  std::vector<float> demb;  // ZB, the embedding's chunk: the embedding output's gradient [R, H]
  // MoE: the load-balancing loss's counts over the chunk's MoE layers (per expert: the tokens
  // whose top-k holds it, the sum of its router probability), the loss, and its gradient with
  // respect to every router probability [E].
  std::vector<double> moe_count, moe_psum;
  int64_t moe_layers = 0;
  double aux = 0;
  std::vector<float> aux_dprob;
  int64_t bytes = 0;        // counted in ActivationStats while held

  int64_t floats() const {
    int64_t n = static_cast<int64_t>(xlast.size() + xf.size() + rstdf.size() + dlogits.size() +
                                     demb.size());
    for (const LayerState& l : layers) n += l.floats();
    return n;
  }
};

// One local chunk: model layers [begin, end), at slots [slot, slot + count) of the per-layer
// arrays, with the states released by its backward kept for reuse (steady-state training
// allocates nothing).
struct Chunk {
  int64_t begin = 0, end = 0, slot = 0;
  bool embedding = false, head = false;
  std::vector<std::unique_ptr<ChunkState>> pool;
};

// Key forward_backward() and loss() use; the pipeline's keys are its micro-batch numbers.
constexpr int kSoloKey = INT_MIN;

}  // namespace

struct TrainModel::Impl {
  ModelConfig config;
  ParamStore& params;
  comm::Group tp;
  TrainModelOptions options;
  comm::Group ep;                 // options.ep
  parallel::TrainMode lmode;      // what the layers run: options.mode with the recompute choice
  bool sp = false;                // sequence parallelism in effect (TP > 1)
  bool defer = false;             // ZB's B/W split
  parallel::ShardSpec vocab;
  // BF16 compute: the matrices rounded to bf16 and held as f32 (the same layout as the masters),
  // so the forward and the input-gradient products see bf16 weights; F32: unused, the layers
  // view the masters.
  Tensor compute;

  const Param* embed_p = nullptr;  // null unless a chunk runs the embedding
  const Param* norm_p = nullptr;   // null unless a chunk runs the head
  const Param* head_p = nullptr;   // the embedding (or its tied copy) when tied
  std::vector<LayerParams> lp;     // per slot (the chunks' layers in local order)

  parallel::VocabParallelEmbedding embed;
  std::vector<parallel::ParallelAttention> attn;
  std::vector<parallel::ParallelMlp> mlp;  // per slot (default-constructed on MoE layers)
  std::vector<parallel::MoeTrainLayer> moe;  // per slot (default-constructed on dense layers)
  std::vector<parallel::MoeTrainWeights> moe_w;
  std::vector<parallel::MoeTrainGrads> moe_g;
  const float* aux_dprob = nullptr;  // the backward's chunk state's (null: no aux gradient)
  double last_aux = 0;
  parallel::VocabParallelLmHead head;

  std::vector<Chunk> chunks;
  std::vector<std::unique_ptr<ChunkState>> held;  // in flight, any order
  TrainModel::ActivationStats stats;

  // Scratch shared by every state: the layers' scratch (GEMM outputs, gathered rows, backward
  // scratch), lent to the layer being run (swapped in and out of its cache), so only one layer's
  // worth exists; the full-recompute scratch holding one layer's rerun forward; the head's
  // logits; the SP embedding's and head's gathered rows; the gradients flowing back through the
  // residual stream (dx) and a norm's output (dxn); a norm weight's gradient under SP.
  parallel::AttentionCache attn_scratch;
  parallel::MlpCache mlp_scratch;
  LayerState rerun;
  std::vector<float> logits, tmp, dx, dxn, sp_rows, norm_grad;
  GradReadyHook hook;

  Impl(const ModelConfig& c, ParamStore& p, comm::Group g, TrainModelOptions o)
      : config(c), params(p), tp(std::move(g)), options(std::move(o)) {}

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
  int64_t rows(int64_t T) const { return sp ? parallel::shard_of(T, tp).size() : T; }

  void lend_scratch(LayerState& s) {
    parallel::AttentionCache& a = s.attn;
    std::swap(a.qkv, attn_scratch.qkv), std::swap(a.xg, attn_scratch.xg);
    std::swap(a.dout, attn_scratch.dout), std::swap(a.seq, attn_scratch.seq);
    std::swap(a.dattn, attn_scratch.dattn), std::swap(a.dq, attn_scratch.dq);
    std::swap(a.dk, attn_scratch.dk), std::swap(a.dv, attn_scratch.dv);
    std::swap(a.positions, attn_scratch.positions);
    parallel::MlpCache& m = s.mlp;
    std::swap(m.dh, mlp_scratch.dh), std::swap(m.dgu, mlp_scratch.dgu);
    std::swap(m.xg, mlp_scratch.xg), std::swap(m.dout, mlp_scratch.dout);
    std::swap(m.seq, mlp_scratch.seq);
  }

  void build();
  const Chunk& chunk_at(int c) const {
    if (c < 0 || c >= static_cast<int>(chunks.size()))
      fail("train", "chunk ", c, " is not one of this rank's ", chunks.size(), " chunks");
    return chunks[c];
  }
  void check_ids(const Chunk& ch, const int32_t* inputs, const int32_t* targets, int64_t B,
                 int64_t S) const;
  ChunkState& acquire(int mb, int c);
  ChunkState& find(int mb, int c, const char* what);
  std::unique_ptr<ChunkState> take(int mb, int c, const char* what);
  void recount(ChunkState& s);
  void release(std::unique_ptr<ChunkState> s, bool counted);

  // RMSNorm's backward over this rank's R rows; under SP the weight's gradient is this rank's
  // rows' part, summed over TP before it is added (the norm weights are replicated).
  void norm_backward(const float* x, const Param* p, const float* rstd, const float* dy, int64_t R,
                     float* dxr, bool accumulate);
  // One layer's forward from x [R, H] with what the backward needs in `w` (the held state, or
  // the rerun scratch); writes the layer's output to `next` unless null (a rerun).
  void layer_forward(int64_t slot, const float* x, LayerState& w, int64_t B, int64_t S,
                     float* next);
  // One layer's backward (ZB: B only): dx [R, H], the residual stream's gradient, in place.
  void layer_backward(int64_t slot, const float* x, LayerState& w, int64_t B, int64_t S,
                      bool last);
  // ZB's W of one layer.
  void layer_weights(int64_t slot, LayerState& w, int64_t B, int64_t S, bool last);
  double forward(int mb, int c, const int32_t* inputs, const int32_t* targets, int64_t B,
                 int64_t S, float grad_scale, const float* x_in, float* x_out, bool training);
  void backward(int mb, int c, const float* dy, float* dx_out, bool last);
  void backward_input(int mb, int c, const float* dy, float* dx_out);
  void backward_weight(int mb, int c, bool last);
};

void TrainModel::Impl::build() {
  const ModelConfig& c = config;
  const int size = tp.size(), rank = tp.rank();
  if (params.tp() != size || params.tp_rank() != rank)
    fail("train", "parameters laid out for TP rank ", params.tp_rank(), " of ", params.tp(),
         " given to TP rank ", rank, " of ", size);
  if (params.ep() != options.ep.size() || params.ep_rank() != options.ep.rank())
    fail("train", "parameters laid out for EP rank ", params.ep_rank(), " of ", params.ep(),
         " given to EP rank ", options.ep.rank(), " of ", options.ep.size());
  if (options.compute != DType::F32 && options.compute != DType::BF16)
    fail("train", "compute dtype ", dtype_name(options.compute), " is not supported (f32, bf16)");
  if (options.compute == DType::BF16) {
    compute = Tensor::zeros(DType::F32, {params.size()});
  }
  lmode = options.mode;
  if (options.recompute == Recompute::Selective) lmode.recompute_probs = true;
  // On one TP rank the sequence split is the whole sequence: the plain path, bit for bit.
  sp = options.mode.sequence_parallel && size > 1;
  defer = options.mode.defer_weight_grads;
  const parallel::HeadPlan heads =
      parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, size, rank);
  const parallel::ShardSpec ffn = parallel::ShardSpec::even(c.intermediate_size, size, rank);
  vocab = parallel::ShardSpec::even(c.vocab_size, size, rank);
  const int64_t H = c.hidden_size, hd = c.head_dim, L = c.num_hidden_layers;
  ep = options.ep;
  if (c.is_moe()) {
    if (c.is_qwen2_moe())
      fail("train", "model_type qwen2_moe cannot be trained (its shared expert and q/k/v biases "
                    "have no backward here); Mixtral-style models can");
    if (sp)
      fail("train", "--sp with a mixture-of-experts model is not supported (the MoE layer takes "
                    "every token of its TP group)");
    if (defer)
      fail("train", "the zero-bubble split (--schedule zb-h1) with a mixture-of-experts model is "
                    "not supported");
    if (options.chunks.size() > 1 || !options.has_embedding || !options.has_head)
      fail("train", "pipeline parallelism with a mixture-of-experts model is not supported "
                    "(the load-balancing loss sums over every layer of a micro-batch)");
    if (std::string why = parallel::moe_ep_problem(c.num_local_experts, ep.size()); !why.empty())
      fail("train", "--ep ", ep.size(), ": ", why);
  } else if (ep.size() > 1) {
    fail("train", "--ep ", ep.size(), " needs a mixture-of-experts model; this one is dense");
  }

  std::vector<pipeline::StageLayers> ranges = options.chunks;
  if (ranges.empty()) ranges.push_back({0, L});
  int64_t slot = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const pipeline::StageLayers& r = ranges[i];
    if (r.begin < 0 || r.end > L || r.begin > r.end)
      fail("train", "chunk ", i, ": layers [", r.begin, ", ", r.end, ") are not a range of the ", L,
           " layers");
    Chunk ch;
    ch.begin = r.begin, ch.end = r.end, ch.slot = slot;
    ch.embedding = i == 0 && options.has_embedding;
    ch.head = i + 1 == ranges.size() && options.has_head;
    slot += r.count();
    chunks.push_back(std::move(ch));
  }

  // The embedding's chunk, the head's, and each chunk's layers must be in the parameter store
  // (ParamStore built with the matching StageTensors).
  const StageTensors& stage = params.stage();
  if ((options.has_embedding && !stage.embedding) || (options.has_head && !stage.head))
    fail("train", "the parameter store's stage lacks the ",
         options.has_embedding && !stage.embedding ? "embedding" : "final norm and head",
         " this rank's chunks run (build it with stage_tensors(options))");
  if (options.has_embedding) embed_p = &params.find(names::kEmbed);
  if (options.has_head) {
    norm_p = &params.find(names::kNorm);
    head_p = c.tie_word_embeddings ? &params.find(names::kEmbed) : &params.find(names::kLmHead);
  }
  parallel::RopeSpec rope{c.rope_inv_freq(), c.rope_interleaved ? kernels::RopeStyle::Interleaved
                                                                : kernels::RopeStyle::HalfSplit};
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Chunk& ch = chunks[i];
    for (int64_t l = ch.begin; l < ch.end; ++l) {
      if (!stage.holds_layer(l))
        fail("train", "layer ", l, " of chunk ", i,
             " is not in the parameter store's stage (build it with stage_tensors(options))");
      auto f = [&](const std::string& suffix) { return &params.find(names::layer(l, suffix)); };
      const bool sparse = c.layer_is_moe(l);
      LayerParams p{f("input_layernorm.weight"),
                    f("self_attn.q_proj.weight"),
                    f("self_attn.k_proj.weight"),
                    f("self_attn.v_proj.weight"),
                    f("self_attn.o_proj.weight"),
                    f("post_attention_layernorm.weight"),
                    sparse ? nullptr : f("mlp.gate_proj.weight"),
                    sparse ? nullptr : f("mlp.up_proj.weight"),
                    sparse ? nullptr : f("mlp.down_proj.weight"),
                    nullptr,
                    {},
                    {},
                    {}};
      // The fused layers view q|k|v and gate|up as one matrix: params.h keeps each group
      // contiguous.
      if (p.k->offset != p.q->offset + p.q->numel || p.v->offset != p.k->offset + p.k->numel ||
          (!sparse && p.up->offset != p.gate->offset + p.gate->numel))
        fail("train", "layer ", l, ": q/k/v or gate/up are not contiguous in the parameter buffer");
      const int64_t qkv_rows = p.q->local_shape[0] + p.k->local_shape[0] + p.v->local_shape[0];
      attn.emplace_back(view(*p.q, {qkv_rows, H}), view(*p.o, p.o->local_shape), heads, hd, rope,
                        tp);
      if (sparse) {
        const parallel::ShardSpec mine =
            parallel::expert_range(c.num_local_experts, ep.size(), ep.rank());
        p.router = f("block_sparse_moe.gate.weight");
        for (int64_t e = mine.begin; e < mine.end; ++e) {
          const std::string ex = cat("block_sparse_moe.experts.", e, ".");
          p.w1.push_back(f(ex + "w1.weight"));
          p.w2.push_back(f(ex + "w2.weight"));
          p.w3.push_back(f(ex + "w3.weight"));
        }
        const parallel::ShardSpec effn = parallel::ShardSpec::even(c.expert_ffn(), size, rank);
        moe.emplace_back(c.num_local_experts, H, static_cast<int>(c.num_experts_per_tok),
                         c.norm_topk_prob, mine, effn, ep, tp);
        parallel::MoeTrainWeights mw;
        parallel::MoeTrainGrads mg;
        mw.router = weights_base() + p.router->offset;
        mg.router = grad(p.router);
        for (size_t e = 0; e < p.w1.size(); ++e) {
          mw.w1.push_back(weights_base() + p.w1[e]->offset);
          mw.w2.push_back(weights_base() + p.w2[e]->offset);
          mw.w3.push_back(weights_base() + p.w3[e]->offset);
          mg.w1.push_back(grad(p.w1[e]));
          mg.w2.push_back(grad(p.w2[e]));
          mg.w3.push_back(grad(p.w3[e]));
        }
        moe_w.push_back(std::move(mw));
        moe_g.push_back(std::move(mg));
        mlp.emplace_back();
      } else {
        mlp.emplace_back(view(*p.gate, {2 * ffn.size(), H}), view(*p.down, p.down->local_shape),
                         ffn, tp);
        moe.emplace_back();
        moe_w.emplace_back();
        moe_g.emplace_back();
      }
      lp.push_back(p);
    }
  }
  if (embed_p != nullptr)
    embed = parallel::VocabParallelEmbedding(view(*embed_p, embed_p->local_shape), vocab, tp);
  if (head_p != nullptr)
    head = parallel::VocabParallelLmHead(view(*head_p, head_p->local_shape), vocab, tp);
}

void TrainModel::Impl::check_ids(const Chunk& ch, const int32_t* inputs, const int32_t* targets,
                                 int64_t B, int64_t S) const {
  if (B <= 0 || S <= 0)
    fail("train", "a micro-batch needs B >= 1 and S >= 1, got B ", B, ", S ", S);
  const int64_t T = B * S, V = config.vocab_size;
  if (T * config.hidden_size > (int64_t{1} << 40))
    fail("train", "micro-batch of ", T, " tokens is too large");
  // Checked before any collective, on every rank alike (all ranks see the same ids).
  if (ch.embedding) {
    if (inputs == nullptr) fail("train", "the embedding's chunk needs the input ids");
    for (int64_t t = 0; t < T; ++t)
      if (inputs[t] < 0 || inputs[t] >= V)
        fail("train", "input token id ", inputs[t], " at position ", t,
             " is outside the vocabulary [0, ", V, ")");
  }
  if (ch.head) {
    if (targets == nullptr) fail("train", "the head's chunk needs the target ids");
    for (int64_t t = 0; t < T; ++t)
      if (targets[t] < 0 || targets[t] >= V)
        fail("train", "target token id ", targets[t], " at position ", t,
             " is outside the vocabulary [0, ", V, ")");
  }
}

ChunkState& TrainModel::Impl::acquire(int mb, int c) {
  for (const auto& s : held)
    if (s->mb == mb && s->chunk == c)
      fail("train", "micro-batch ", mb, " is already in flight through chunk ", c);
  Chunk& ch = chunks[c];
  std::unique_ptr<ChunkState> s;
  if (!ch.pool.empty()) {
    s = std::move(ch.pool.back());
    ch.pool.pop_back();
  } else {
    s = std::make_unique<ChunkState>();
    s->layers.resize(static_cast<size_t>(ch.end - ch.begin));
  }
  s->mb = mb, s->chunk = c, s->bytes = 0, s->input_done = false;
  held.push_back(std::move(s));
  return *held.back();
}

ChunkState& TrainModel::Impl::find(int mb, int c, const char* what) {
  chunk_at(c);
  for (const auto& s : held)
    if (s->mb == mb && s->chunk == c) return *s;
  fail("train", what, ": micro-batch ", mb, " has no forward in flight through chunk ", c);
}

std::unique_ptr<ChunkState> TrainModel::Impl::take(int mb, int c, const char* what) {
  chunk_at(c);
  for (size_t i = 0; i < held.size(); ++i) {
    if (held[i]->mb != mb || held[i]->chunk != c) continue;
    std::unique_ptr<ChunkState> s = std::move(held[i]);
    held[i] = std::move(held.back());
    held.pop_back();
    return s;
  }
  fail("train", what, ": micro-batch ", mb, " has no forward in flight through chunk ", c);
}

// A held state's bytes, measured again (after its forward, or after ZB's B).
void TrainModel::Impl::recount(ChunkState& s) {
  stats.held_bytes -= s.bytes;
  s.bytes = s.floats() * static_cast<int64_t>(sizeof(float));
  stats.held_bytes += s.bytes;
  stats.peak_bytes = std::max(stats.peak_bytes, stats.held_bytes);
}

void TrainModel::Impl::release(std::unique_ptr<ChunkState> s, bool counted) {
  if (counted) {
    stats.held_bytes -= s->bytes;
    stats.in_flight -= 1;
  }
  s->bytes = 0;
  chunks[s->chunk].pool.push_back(std::move(s));
}

void TrainModel::Impl::norm_backward(const float* x, const Param* p, const float* rstd,
                                     const float* dy, int64_t R, float* dxr, bool accumulate) {
  const int64_t H = config.hidden_size;
  if (!sp) {
    kernels::rmsnorm_backward(x, value(p), rstd, dy, R, H, dxr, grad(p), accumulate);
    return;
  }
  norm_grad.assign(static_cast<size_t>(H), 0.0f);
  kernels::rmsnorm_backward(x, value(p), rstd, dy, R, H, dxr, norm_grad.data(), accumulate);
  tp.all_reduce(norm_grad.data(), norm_grad.size());
  float* g = grad(p);
  for (int64_t i = 0; i < H; ++i) g[i] += norm_grad[i];
}

void TrainModel::Impl::layer_forward(int64_t slot, const float* x, LayerState& w, int64_t B,
                                     int64_t S, float* next) {
  const int64_t T = B * S, R = rows(T), H = config.hidden_size;
  const float eps = static_cast<float>(config.rms_norm_eps);
  const LayerParams& p = lp[slot];
  resize(w.xn1, R * H), resize(w.x2, R * H), resize(w.xn2, R * H);
  resize(w.rstd1, R), resize(w.rstd2, R);
  kernels::rmsnorm_forward(x, value(p.in_norm), R, H, eps, w.xn1.data(), w.rstd1.data());
  lend_scratch(w);
  attn[slot].forward_train(w.xn1.data(), B, S, w.attn, tmp.data(), lmode);
  for (int64_t i = 0; i < R * H; ++i) w.x2[i] = x[i] + tmp[i];
  kernels::rmsnorm_forward(w.x2.data(), value(p.post_norm), R, H, eps, w.xn2.data(),
                           w.rstd2.data());
  if (p.moe())
    moe[slot].forward(moe_w[slot], w.xn2.data(), T, w.moe, tmp.data());
  else
    mlp[slot].forward_train(w.xn2.data(), T, w.mlp, tmp.data(), lmode);
  lend_scratch(w);  // back
  if (next != nullptr)
    for (int64_t i = 0; i < R * H; ++i) next[i] = w.x2[i] + tmp[i];
}

void TrainModel::Impl::layer_backward(int64_t slot, const float* x, LayerState& w, int64_t B,
                                      int64_t S, bool last) {
  const int64_t T = B * S, R = rows(T);
  const LayerParams& p = lp[slot];
  // ZB's B: the matrices' gradients wait for layer_weights(); the hooks fire there.
  float* dgu = defer || p.moe() ? nullptr : grad(p.gate);
  float* ddown = defer || p.moe() ? nullptr : grad(p.down);
  float* dqkv = defer ? nullptr : grad(p.q);
  float* d_o = defer ? nullptr : grad(p.o);
  const bool fire = last && !defer;
  lend_scratch(w);
  if (p.moe()) {
    moe[slot].backward(moe_w[slot], w.xn2.data(), w.moe, dx.data(), T, aux_dprob, dxn.data(),
                       moe_g[slot]);
    if (fire) {
      ready(p.router);
      for (size_t e = 0; e < p.w1.size(); ++e) ready(p.w1[e]), ready(p.w2[e]), ready(p.w3[e]);
    }
  } else {
    mlp[slot].backward(w.xn2.data(), w.mlp, dx.data(), T, dxn.data(), dgu, ddown, lmode);
    if (fire) ready(p.down), ready(p.gate), ready(p.up);
  }
  norm_backward(w.x2.data(), p.post_norm, w.rstd2.data(), dxn.data(), R, dx.data(), true);
  if (fire) ready(p.post_norm);
  attn[slot].backward(w.xn1.data(), w.attn, dx.data(), B, S, dxn.data(), dqkv, d_o, lmode);
  if (fire) ready(p.o), ready(p.q), ready(p.k), ready(p.v);
  norm_backward(x, p.in_norm, w.rstd1.data(), dxn.data(), R, dx.data(), true);
  lend_scratch(w);  // back
  if (fire) ready(p.in_norm);
}

void TrainModel::Impl::layer_weights(int64_t slot, LayerState& w, int64_t B, int64_t S,
                                     bool last) {
  const LayerParams& p = lp[slot];
  lend_scratch(w);
  mlp[slot].backward_weight(w.xn2.data(), w.mlp, B * S, grad(p.gate), grad(p.down), lmode);
  if (last) ready(p.down), ready(p.gate), ready(p.up), ready(p.post_norm);
  attn[slot].backward_weight(w.xn1.data(), w.attn, B, S, grad(p.q), grad(p.o), lmode);
  lend_scratch(w);  // back
  if (last) ready(p.o), ready(p.q), ready(p.k), ready(p.v), ready(p.in_norm);
}

double TrainModel::Impl::forward(int mb, int c, const int32_t* inputs, const int32_t* targets,
                                 int64_t B, int64_t S, float grad_scale, const float* x_in,
                                 float* x_out, bool training) {
  const Chunk& ch = chunk_at(c);
  check_ids(ch, inputs, targets, B, S);
  if (!ch.embedding && x_in == nullptr)
    fail("train", "chunk ", c, " has no embedding: its forward needs x_in");
  if (!ch.head && x_out == nullptr)
    fail("train", "chunk ", c, " has no head: its forward needs x_out");
  const int64_t T = B * S, R = rows(T), H = config.hidden_size;
  const float eps = static_cast<float>(config.rms_norm_eps);
  const bool full = options.recompute == Recompute::Full;
  ChunkState& s = acquire(mb, c);
  s.B = B, s.S = S;
  if (ch.embedding) s.ids.assign(inputs, inputs + T);
  for (LayerState& l : s.layers) resize(l.x, R * H);
  if (ch.head) resize(s.xlast, R * H), resize(s.xf, R * H), resize(s.rstdf, R);
  resize(tmp, T * H);

  const int64_t n = ch.end - ch.begin;
  float* out = ch.head ? s.xlast.data() : x_out;  // where the chunk's last layer writes
  float* first = n > 0 ? s.layers[0].x.data() : out;
  if (ch.embedding) {
    embed.forward(inputs, T, first, sp, &sp_rows);
  } else {
    std::memcpy(first, x_in, static_cast<size_t>(R * H) * sizeof(float));
  }
  const int64_t E = config.num_local_experts;
  s.moe_count.assign(static_cast<size_t>(E), 0.0);
  s.moe_psum.assign(static_cast<size_t>(E), 0.0);
  s.moe_layers = 0;
  for (int64_t i = 0; i < n; ++i) {
    LayerState& l = s.layers[i];
    float* next = i + 1 < n ? s.layers[i + 1].x.data() : out;
    LayerState& w = full ? rerun : l;
    layer_forward(ch.slot + i, l.x.data(), w, B, S, next);
    if (lp[ch.slot + i].moe()) {
      // The load-balancing loss's counts (Hugging Face: over the concatenation of every MoE
      // layer's router logits).
      ++s.moe_layers;
      for (int32_t e : w.moe.experts) s.moe_count[e] += 1.0;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) s.moe_psum[e] += w.moe.probs[t * E + e];
    }
  }
  s.aux = 0;
  s.aux_dprob.clear();
  if (s.moe_layers > 0 && T > 0) {
    // aux = E * sum_e (C_e / N) (Psum_e / N); d aux / d p_{t,e} = E * C_e / N^2 for every token
    // of every MoE layer (f is counted, not differentiated).
    const double N = static_cast<double>(s.moe_layers * T);
    for (int64_t e = 0; e < E; ++e) s.aux += s.moe_count[e] * s.moe_psum[e];
    s.aux *= static_cast<double>(E) / (N * N);
    const double coef = config.router_aux_loss_coef * options.aux_scale;
    if (coef != 0) {
      s.aux_dprob.resize(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e)
        s.aux_dprob[e] = static_cast<float>(coef * static_cast<double>(E) * s.moe_count[e] /
                                            (N * N));
    }
  }
  last_aux = s.aux;
  double loss = 0;
  if (ch.head) {
    kernels::rmsnorm_forward(s.xlast.data(), value(norm_p), R, H, eps, s.xf.data(),
                             s.rstdf.data());
    resize(logits, T * vocab.size());
    head.forward(s.xf.data(), T, logits.data(), sp, &sp_rows);  // all T rows (gathered under SP)
    resize(s.dlogits, training ? T * vocab.size() : 0);
    loss = parallel::cross_entropy(head.exchange(), logits.data(), T, vocab.size(), vocab.begin,
                                   targets, grad_scale, training ? s.dlogits.data() : nullptr);
  }
  if (training) {
    stats.in_flight += 1;
    stats.peak_in_flight = std::max(stats.peak_in_flight, stats.in_flight);
    recount(s);
  }
  return loss;
}

void TrainModel::Impl::backward(int mb, int c, const float* dy, float* dx_out, bool last) {
  if (defer) {  // B then W: bit for bit the undivided backward
    backward_input(mb, c, dy, dx_out);
    backward_weight(mb, c, last);
    return;
  }
  const Chunk& ch = chunk_at(c);
  if (!ch.head && dy == nullptr)
    fail("train", "chunk ", c, " has no head: its backward needs dy");
  if (!ch.embedding && dx_out == nullptr)
    fail("train", "chunk ", c, " has no embedding: its backward needs dx");
  std::unique_ptr<ChunkState> held_state = take(mb, c, "backward");
  ChunkState& s = *held_state;
  const int64_t B = s.B, S = s.S, T = B * S, R = rows(T), H = config.hidden_size;
  const bool full = options.recompute == Recompute::Full;
  resize(dx, R * H), resize(dxn, R * H), resize(tmp, T * H);

  // dx is the gradient of the residual stream, dxn of a norm's output.
  if (ch.head) {
    // All-reduces dxn (reduce-scatters it to this rank's rows under SP).
    head.backward(s.xf.data(), s.dlogits.data(), T, dxn.data(), grad(head_p), sp, &sp_rows);
    if (last && head_p != embed_p) ready(head_p);
    norm_backward(s.xlast.data(), norm_p, s.rstdf.data(), dxn.data(), R, dx.data(), false);
    if (last) ready(norm_p);
  } else {
    std::memcpy(dx.data(), dy, static_cast<size_t>(R * H) * sizeof(float));
  }
  aux_dprob = s.aux_dprob.empty() ? nullptr : s.aux_dprob.data();
  for (int64_t i = ch.end - ch.begin - 1; i >= 0; --i) {
    LayerState& l = s.layers[i];
    // Full recomputation: the layer's forward again from its kept input, into the scratch.
    if (full) layer_forward(ch.slot + i, l.x.data(), rerun, B, S, nullptr);
    layer_backward(ch.slot + i, l.x.data(), full ? rerun : l, B, S, last);
  }
  if (ch.embedding) {
    embed.backward(s.ids.data(), T, dx.data(), grad(embed_p), sp, &sp_rows);
    if (last) ready(embed_p);
  } else {
    std::memcpy(dx_out, dx.data(), static_cast<size_t>(R * H) * sizeof(float));
  }
  release(std::move(held_state), true);
}

void TrainModel::Impl::backward_input(int mb, int c, const float* dy, float* dx_out) {
  if (!defer)
    fail("train", "backward_input needs TrainModelOptions.mode.defer_weight_grads (the ZB split)");
  const Chunk& ch = chunk_at(c);
  if (!ch.head && dy == nullptr)
    fail("train", "chunk ", c, " has no head: its backward needs dy");
  if (!ch.embedding && dx_out == nullptr)
    fail("train", "chunk ", c, " has no embedding: its backward needs dx");
  ChunkState& s = find(mb, c, "backward_input");
  if (s.input_done)
    fail("train", "backward_input: micro-batch ", mb, " already ran B through chunk ", c);
  const int64_t B = s.B, S = s.S, T = B * S, R = rows(T), H = config.hidden_size;
  const bool full = options.recompute == Recompute::Full;
  resize(dx, R * H), resize(dxn, R * H), resize(tmp, T * H);

  if (ch.head) {
    head.backward_input(s.dlogits.data(), T, dxn.data(), sp, &sp_rows);
    norm_backward(s.xlast.data(), norm_p, s.rstdf.data(), dxn.data(), R, dx.data(), false);
    s.xlast.clear(), s.rstdf.clear();  // W needs xf and dlogits only
  } else {
    std::memcpy(dx.data(), dy, static_cast<size_t>(R * H) * sizeof(float));
  }
  for (int64_t i = ch.end - ch.begin - 1; i >= 0; --i) {
    LayerState& l = s.layers[i];
    if (full) layer_forward(ch.slot + i, l.x.data(), rerun, B, S, nullptr);
    layer_backward(ch.slot + i, l.x.data(), full ? rerun : l, B, S, false);
    l.keep_for_weights();
    if (full) l.take_weight_inputs(rerun);
  }
  if (ch.embedding) {
    s.demb.assign(dx.begin(), dx.begin() + R * H);  // the embedding's gradient waits for W
  } else {
    std::memcpy(dx_out, dx.data(), static_cast<size_t>(R * H) * sizeof(float));
  }
  s.input_done = true;
  recount(s);
}

void TrainModel::Impl::backward_weight(int mb, int c, bool last) {
  if (!defer)
    fail("train", "backward_weight needs TrainModelOptions.mode.defer_weight_grads (the ZB split)");
  const Chunk& ch = chunk_at(c);
  if (!find(mb, c, "backward_weight").input_done)
    fail("train", "backward_weight: micro-batch ", mb, " has not run backward_input through chunk ",
         c);
  std::unique_ptr<ChunkState> held_state = take(mb, c, "backward_weight");
  ChunkState& s = *held_state;
  const int64_t B = s.B, S = s.S, T = B * S;
  if (ch.head) {
    head.backward_weight(s.xf.data(), s.dlogits.data(), T, grad(head_p), sp, &sp_rows);
    if (last && head_p != embed_p) ready(head_p);
    if (last) ready(norm_p);
  }
  for (int64_t i = ch.end - ch.begin - 1; i >= 0; --i)
    layer_weights(ch.slot + i, s.layers[i], B, S, last);
  if (ch.embedding) {
    embed.backward(s.ids.data(), T, s.demb.data(), grad(embed_p), sp, &sp_rows);
    if (last) ready(embed_p);
  }
  s.demb.clear();
  release(std::move(held_state), true);
}

TrainModel::TrainModel(const ModelConfig& config, ParamStore& params, comm::Group tp,
                       TrainModelOptions options)
    : impl_(std::make_unique<Impl>(config, params, std::move(tp), std::move(options))) {
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

namespace {
void require_one_chunk(const TrainModel& m, const char* what) {
  if (m.chunks() != 1 || !m.has_embedding() || !m.has_head())
    fail("train", what, " needs one chunk holding the embedding and the head (PP 1); this rank has ",
         m.chunks(), " chunk(s)", m.has_embedding() ? "" : " without the embedding",
         m.has_head() ? "" : " without the head", ": use forward/backward per chunk");
}
}  // namespace

double TrainModel::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B,
                                    int64_t S, float grad_scale) {
  require_one_chunk(*this, "forward_backward");
  const double loss =
      impl_->forward(kSoloKey, 0, inputs, targets, B, S, grad_scale, nullptr, nullptr, true);
  impl_->backward(kSoloKey, 0, nullptr, nullptr, true);
  return loss;
}

double TrainModel::last_aux_loss() const {
  return impl_->last_aux;
}

double TrainModel::loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t S) {
  require_one_chunk(*this, "loss");
  Impl& m = *impl_;
  const double loss = m.forward(kSoloKey, 0, inputs, targets, B, S, 1.0f, nullptr, nullptr, false);
  m.release(m.take(kSoloKey, 0, "loss"), false);  // evaluation: not counted in the stats
  return loss;
}

double TrainModel::forward(int mb, int chunk, const int32_t* inputs, const int32_t* targets,
                           int64_t B, int64_t S, float grad_scale, const float* x_in,
                           float* x_out) {
  return impl_->forward(mb, chunk, inputs, targets, B, S, grad_scale, x_in, x_out, true);
}

void TrainModel::backward(int mb, int chunk, const float* dy, float* dx, bool last) {
  impl_->backward(mb, chunk, dy, dx, last);
}

void TrainModel::backward_input(int mb, int chunk, const float* dy, float* dx) {
  impl_->backward_input(mb, chunk, dy, dx);
}

void TrainModel::backward_weight(int mb, int chunk, bool last) {
  impl_->backward_weight(mb, chunk, last);
}

void TrainModel::discard(int mb, int chunk) {
  impl_->release(impl_->take(mb, chunk, "discard"), true);
}

void TrainModel::discard_all() {
  Impl& m = *impl_;
  while (!m.held.empty()) {
    std::unique_ptr<ChunkState> s = std::move(m.held.back());
    m.held.pop_back();
    m.release(std::move(s), true);
  }
}

int64_t TrainModel::activation_rows(int64_t B, int64_t S) const {
  return impl_->rows(B * S);
}
int TrainModel::chunks() const {
  return static_cast<int>(impl_->chunks.size());
}
bool TrainModel::has_embedding() const {
  return impl_->options.has_embedding;
}
bool TrainModel::has_head() const {
  return impl_->options.has_head;
}

TrainModel::ActivationStats TrainModel::activation_stats() const {
  return impl_->stats;
}

void TrainModel::reset_stats() {
  ActivationStats& s = impl_->stats;
  s.peak_bytes = s.held_bytes;
  s.peak_in_flight = s.in_flight;
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
    layouts[r] = param_layout(params.config(), tp.size(), r, &size, params.stage(), params.ep(),
                              params.ep_rank());
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
        ends_with(p.tensor.name, "o_proj.weight") ||
                ends_with(p.tensor.name, "down_proj.weight") ||
                ends_with(p.tensor.name, "w2.weight")
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
