#include "parallm/plan/memory.h"

#include <algorithm>

#include "parallm/core/error.h"
#include "parallm/model/llama.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/parallel/shard.h"
#include "parallm/pipeline/partition.h"

namespace parallm::plan {
std::string layout_problem(const ModelConfig& c, const Layout& l) {
  if (l.tp < 1 || l.pp < 1 || l.dp < 1 || l.ep < 1)
    return cat("every degree must be >= 1 (", l.str(), ")");
  // The engine decides (llama_tp_problem: HeadPlan's head rule; FFN and vocabulary split
  // unevenly, so only an empty shard stops them); the message names the count at fault and the
  // sizes the engine runs.
  if (std::string p = llama_tp_problem(c, l.tp); !p.empty()) {
    const std::string sizes =
        cat(" (the engine runs TP sizes ",
            parallel::HeadPlan::valid_sizes(c.num_attention_heads, c.num_key_value_heads), ")");
    if (c.num_attention_heads % l.tp != 0)
      return cat("TP=", l.tp, " does not divide the ", c.num_attention_heads, " attention heads",
                 sizes);
    if (c.num_key_value_heads % l.tp != 0 && l.tp % c.num_key_value_heads != 0)
      return cat("TP=", l.tp, " neither divides nor is a multiple of the ", c.num_key_value_heads,
                 " KV heads", sizes);
    return cat("TP=", l.tp, ": ", p);
  }
  if (l.pp > c.num_hidden_layers)
    return cat("PP=", l.pp, " exceeds the ", c.num_hidden_layers, " layers");
  if (l.ep > 1 && !c.is_moe()) return cat("EP=", l.ep, " needs a mixture-of-experts model");
  // The engine's placement (parallel::expert_range) runs uneven splits: the first E % EP ranks
  // hold one expert more; only a rank without an expert is refused.
  if (c.is_moe() && l.ep > c.num_local_experts)
    return cat("EP=", l.ep, " exceeds the ", c.num_local_experts,
               " experts (each expert-parallel rank needs at least one)");
  if (l.dp % l.ep != 0)
    return cat("EP=", l.ep, " must divide DP=", l.dp, " (expert parallelism is carved out of DP)");
  // Experts over TP: the engine's own rule (a MoE model, no --ep beside it, TP <= experts).
  if (l.experts_over_tp) return llama_expert_parallel_problem(c, l.tp, l.ep);
  return "";
}

std::vector<int64_t> layers_per_stage(int64_t layers, int pp) {
  std::vector<int64_t> out;
  for (const pipeline::StageLayers& s : pipeline::partition_layers(layers, pp))
    out.push_back(s.count());
  return out;
}

int64_t kv_heads_per_rank(const ModelConfig& c, int tp) {
  return c.num_key_value_heads >= tp ? c.num_key_value_heads / tp : 1;
}

StageParams stage_params(const ModelConfig& c, const Layout& l, int stage, int tp_rank,
                         int ep_rank, bool experts_over_tp) {
  experts_over_tp = experts_over_tp || l.experts_over_tp;
  const std::string problem = layout_problem(c, l);
  if (!problem.empty()) fail("plan", problem);
  if (stage < 0 || stage >= l.pp) fail("plan", "stage ", stage, " out of 0..", l.pp - 1);
  if (tp_rank >= l.tp) fail("plan", "TP rank ", tp_rank, " out of 0..", l.tp - 1);
  if (ep_rank < 0 || ep_rank >= l.ep) fail("plan", "EP rank ", ep_rank, " out of 0..", l.ep - 1);
  if (tp_rank < 0) {  // the fullest rank: shards of an uneven split differ by a row
    StageParams best;
    for (int r = 0; r < l.tp; ++r) {
      const StageParams p = stage_params(c, l, stage, r, ep_rank, experts_over_tp);
      if (r == 0 || p.total() > best.total()) best = p;
    }
    return best;
  }
  const pipeline::StageLayers layers = pipeline::partition_layers(c.num_hidden_layers, l.pp)[stage];
  const LlamaRankShare s =
      llama_rank_share(c, l.tp, tp_rank, layers.begin, layers.end, l.ep, ep_rank, experts_over_tp);
  StageParams p;
  p.stage = stage;
  p.tp_rank = tp_rank;
  p.layers = layers.count();
  p.attention = double(s.attention);
  p.mlp = double(s.mlp + s.router);
  p.router = double(s.router);
  p.experts = double(s.experts);
  p.norms = double(s.norms);
  p.embedding = double(s.embedding);
  p.head = double(s.head);
  return p;
}

double rank_weight_bytes(const ModelConfig& c, const Layout& l, Precision weights, int stage,
                         int tp_rank, int ep_rank, bool experts_over_tp) {
  return stage_params(c, l, stage, tp_rank, ep_rank, experts_over_tp)
      .weight_bytes(precision_bytes(weights));
}

double kv_bytes_per_token(const ModelConfig& c, int tp, int64_t layers, Precision kv) {
  return 2.0 * double(layers) * double(kv_heads_per_rank(c, tp) * c.head_dim) * precision_bytes(kv);
}

double activation_bytes_per_layer(const ModelConfig& c, int64_t s, int64_t b, int tp, bool sp,
                                  Recompute r) {
  const double T = double(s) * double(b), h = double(c.hidden_size), t = tp;
  if (r == Recompute::Full) return 2 * T * h / (sp ? t : 1);
  const double ffn = double(c.intermediate_size) * (c.is_moe() ? c.num_experts_per_tok : 1);
  const double kv_rank = double(kv_heads_per_rank(c, tp) * c.head_dim);
  const double replicated = 8 * T * h;
  const double sharded = 2 * T * (2 * double(c.q_dim()) / t + 2 * kv_rank + 4 * ffn / t);
  double bytes = (sp ? replicated / t : replicated) + sharded;
  if (r == Recompute::None)
    bytes += 2 * double(b) * (double(c.num_attention_heads) / t) * double(s) * double(s);
  return bytes;
}

namespace {

// One TP rank's local sizes of a training micro-batch (the engine's splits: HeadPlan for heads,
// ShardSpec::even for FFN rows, vocabulary rows and, under SP, token rows).
struct LocalDims {
  int64_t T = 0, T_sp = 0;  // tokens; this rank's token rows under SP (else T)
  int64_t q_heads = 0, qd = 0, kvd = 0, f = 0, v_local = 0;
};

LocalDims local_dims(const ModelConfig& c, const ActivationShape& a) {
  LocalDims d;
  d.T = a.micro_batch * a.seq_len;
  d.T_sp = a.sequence_parallel ? parallel::ShardSpec::even(d.T, a.tp, a.tp_rank).size() : d.T;
  const parallel::HeadPlan heads =
      parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, a.tp, a.tp_rank);
  d.q_heads = heads.q_heads;
  d.qd = heads.q_heads * c.head_dim;
  d.kvd = heads.kv_heads * c.head_dim;
  // The engine trains dense MLPs; a mixture of experts is counted as top-k MLPs per token.
  const int64_t ffn = c.intermediate_size * (c.is_moe() ? c.num_experts_per_tok : 1);
  d.f = parallel::ShardSpec::even(ffn, a.tp, a.tp_rank).size();
  d.v_local = parallel::ShardSpec::even(c.vocab_size, a.tp, a.tp_rank).size();
  return d;
}

}  // namespace

int64_t activation_bytes_per_chunk(const ModelConfig& c, const ActivationShape& a) {
  if (a.micro_batch < 1)
    fail("plan", "activation shape: micro_batch must be >= 1, got ", a.micro_batch);
  if (a.seq_len < 1) fail("plan", "activation shape: seq_len must be >= 1, got ", a.seq_len);
  if (a.tp < 1) fail("plan", "activation shape: tp must be >= 1, got ", a.tp);
  if (a.tp_rank < 0 || a.tp_rank >= a.tp)
    fail("plan", "activation shape: tp_rank ", a.tp_rank, " out of 0..", a.tp - 1);
  if (a.recompute < 0 || a.recompute > 2)
    fail("plan", "activation shape: recompute must be 0 (none), 1 (selective) or 2 (full), got ",
         a.recompute);
  if (a.layers < 0) fail("plan", "activation shape: layers must be >= 0, got ", a.layers);
  const int64_t B = a.micro_batch, S = a.seq_len, H = c.hidden_size;
  const LocalDims d = local_dims(c, a);
  const int64_t T = d.T, T_sp = d.T_sp, qd = d.qd, kvd = d.kvd, f = d.f;
  // Counted in double first: shapes far beyond any machine must not wrap around int64.
  auto count = [&](auto zero) {
    using N = decltype(zero);
    N per_layer = 0;  // floats
    if (a.recompute == 2) {
      per_layer = N(T_sp) * N(H);
    } else {
      per_layer = N(T_sp) * N(4 * H + 2) + N(T) * N(2 * qd + 2 * kvd + 3 * f);
      if (a.recompute == 0) per_layer += N(B) * N(d.q_heads) * N(S) * N(S);
    }
    N floats = N(a.layers) * per_layer;
    if (a.head) floats += N(T_sp) * N(2 * H + 1) + N(T) * N(d.v_local);
    return floats * N(sizeof(float));
  };
  if (count(0.0) > 9e18)
    fail("plan", "activation shape: ", a.micro_batch, " x ", a.seq_len, " tokens and ", a.layers,
         " layers make more than 9e18 bytes of activations");
  return count(int64_t{0});
}

int64_t weight_grad_bytes_per_chunk(const ModelConfig& c, const ActivationShape& a,
                                    bool embedding) {
  activation_bytes_per_chunk(c, a);  // the same checks
  const int64_t H = c.hidden_size;
  const LocalDims d = local_dims(c, a);
  const int64_t T = d.T, T_sp = d.T_sp, qd = d.qd, kvd = d.kvd, f = d.f;
  // In double first, as activation_bytes_per_chunk.
  auto count = [&](auto zero) {
    using N = decltype(zero);
    N floats = N(a.layers) * (N(2 * H) * N(T_sp) + N(T) * N(2 * qd + 2 * kvd + 3 * f + 2 * H));
    if (a.head)
      floats += N(T_sp) * N(H) + N(T) * N(d.v_local);
    if (embedding) floats += N(T_sp) * N(H);
    return floats * N(sizeof(float));
  };
  if (count(0.0) > 9e18)
    fail("plan", "activation shape: ", a.micro_batch, " x ", a.seq_len, " tokens and ", a.layers,
         " layers make more than 9e18 bytes kept for W");
  return count(int64_t{0});
}

double korthikanti_gpt_bytes_per_layer(int64_t s, int64_t b, int64_t h, int64_t a, int t, bool sp,
                                       Recompute r) {
  const double sbh = double(s) * double(b) * double(h);
  const double score = 5.0 * double(a) * double(s) / double(h);
  if (r == Recompute::Full) return 2 * sbh / (sp ? t : 1);
  const double attn = r == Recompute::None ? score : 0;
  if (sp) return sbh / t * (34 + attn);
  return sbh * (10 + 24.0 / t + attn / t);
}

MemoryBreakdown inference_memory(const ModelConfig& c, const Layout& l, const InferenceWorkload& w,
                                 int stage, int64_t replica_batch, int64_t micro_batch) {
  const StageParams p = stage_params(c, l, stage);
  MemoryBreakdown m;
  m.stage = stage;
  m.weights = p.weight_bytes(precision_bytes(w.weights));
  m.kv_cache = kv_bytes_per_token(c, l.tp, p.layers, w.kv_cache) * double(replica_batch) *
               double(w.prompt_len + w.output_len);
  // The engine's working set, in f32 whatever the weights: its workspace for a step of the
  // micro-batch's prompts (LlamaModel::workspace_bytes, exactly what make_workspace allocates, on
  // the fullest TP rank: uneven FFN shards differ), the residual stream x [T, hidden] the step runs
  // through, and on the last stage the logits [micro_batch, largest vocab shard]. (MoE layers are
  // counted as one dense MLP: the engine does not run them yet.)
  const int64_t T = micro_batch * w.prompt_len;
  uint64_t workspace = 0;
  for (int r = 0; r < l.tp; ++r)
    workspace = std::max(workspace, LlamaModel::workspace_bytes(c, l.tp, r, T));
  m.activations = double(workspace) + double(T) * double(c.hidden_size) * sizeof(float);
  if (stage == l.pp - 1)
    m.activations += double(micro_batch) *
                     double(parallel::ShardSpec::max_size(c.vocab_size, l.tp)) * sizeof(float);
  return m;
}

std::vector<double> chunk_activation_bytes(const ModelConfig& c, const Layout& l,
                                           const TrainingWorkload& w, int chunks, int stage,
                                           int tp_rank, bool after_input) {
  if (chunks < 1) fail("plan", "chunks must be >= 1, got ", chunks);
  if (stage < 0 || stage >= l.pp) fail("plan", "stage ", stage, " out of 0..", l.pp - 1);
  const int virtual_stages = l.pp * chunks;
  const std::vector<pipeline::StageLayers> parts =
      pipeline::partition_layers(c.num_hidden_layers, virtual_stages);
  const double scale = precision_bytes(w.precision) / sizeof(float);
  ActivationShape a;
  a.micro_batch = w.micro_batch;
  a.seq_len = w.seq_len;
  a.tp = l.tp;
  a.tp_rank = tp_rank;
  a.sequence_parallel = w.sequence_parallel && l.tp > 1;
  a.recompute = w.recompute == Recompute::None ? 0 : w.recompute == Recompute::Selective ? 1 : 2;
  std::vector<double> out;
  for (int ch = 0; ch < chunks; ++ch) {
    const int g = ch * l.pp + stage;
    a.layers = parts[size_t(g)].count();
    a.head = g == virtual_stages - 1;
    const double bytes = after_input ? double(weight_grad_bytes_per_chunk(c, a, g == 0))
                                     : double(activation_bytes_per_chunk(c, a));
    out.push_back(bytes * scale);
  }
  return out;
}

std::vector<StageActivations> stage_activations(const ModelConfig& c, const Layout& l,
                                                const TrainingWorkload& w,
                                                const pipeline::Schedule& s) {
  if (s.stages != l.pp) fail("plan", "schedule of ", s.stages, " stages for a layout of PP=", l.pp);
  const double scale = precision_bytes(w.precision) / sizeof(float);
  std::vector<StageActivations> out;
  for (int st = 0; st < l.pp; ++st) {
    StageActivations best;
    best.stage = st;
    for (int r = 0; r < l.tp; ++r) {
      const std::vector<double> bytes = chunk_activation_bytes(c, l, w, s.chunks, st, r);
      const std::vector<double> for_w = chunk_activation_bytes(c, l, w, s.chunks, st, r, true);
      StageActivations a;
      a.stage = st;
      for (double b : bytes) a.per_micro_batch += b;
      double held = 0;
      int states = 0;
      for (const pipeline::Action& act : s.actions(st)) {
        const size_t ch = size_t(act.chunk);
        switch (act.kind) {
          case pipeline::ActionKind::Forward:
            held += bytes[ch];
            ++states;
            break;
          case pipeline::ActionKind::Backward:
            held -= bytes[ch];
            --states;
            break;
          case pipeline::ActionKind::BackwardInput:
            held += for_w[ch] - bytes[ch];
            break;
          case pipeline::ActionKind::BackwardWeight:
            held -= for_w[ch];
            --states;
            break;
          default:
            break;
        }
        a.peak_bytes = std::max(a.peak_bytes, held);
        a.peak_states = std::max(a.peak_states, states);
      }
      // Scratch: one layer's whole state (recompute none), and the logits [T, V_local] on the
      // head's stage.
      ActivationShape one;
      one.micro_batch = w.micro_batch;
      one.seq_len = w.seq_len;
      one.tp = l.tp;
      one.tp_rank = r;
      one.sequence_parallel = w.sequence_parallel && l.tp > 1;
      one.layers = 1;
      a.scratch = double(activation_bytes_per_chunk(c, one)) * scale;
      if (st == l.pp - 1)  // the last virtual stage, (v - 1) p + p - 1, is on the last stage
        a.scratch += double(w.micro_batch) * double(w.seq_len) *
                     double(parallel::ShardSpec::even(c.vocab_size, l.tp, r).size()) * 4 * scale;
      if (r == 0 || a.peak_bytes + a.scratch > best.peak_bytes + best.scratch) best = a;
    }
    out.push_back(best);
  }
  return out;
}

MemoryBreakdown training_memory(const ModelConfig& c, const Layout& l, const TrainingWorkload& w,
                                int stage, double in_flight) {
  const StageParams p = stage_params(c, l, stage);
  MemoryBreakdown m;
  m.stage = stage;
  const double dp_dense = l.dp, dp_expert = double(l.dp) / l.ep;
  auto sharded = [&](double bytes_per_param, bool shard) {
    return bytes_per_param *
           (p.dense() / (shard ? dp_dense : 1) + p.experts / (shard ? dp_expert : 1));
  };
  const bool f32 = w.precision == Precision::FP32;
  const bool adam = w.optimizer == Optimizer::Adam;
  m.weights = sharded(f32 ? 4 : 2, w.zero >= 3);
  m.gradients = sharded(f32 ? 4 : 2, w.zero >= 2);
  m.optimizer = sharded(f32 ? (adam ? 8 : 4) : (adam ? 12 : 8), w.zero >= 1);
  // One micro-batch through the stage's chunks (v = 1: the stage is one chunk), the fullest rank.
  const pipeline::Schedule one = pipeline::make_schedule(pipeline::ScheduleKind::GPipe, l.pp, 1);
  const StageActivations a = stage_activations(c, l, w, one)[size_t(stage)];
  m.activations = in_flight * a.per_micro_batch + a.scratch;
  return m;
}

}  // namespace parallm::plan
