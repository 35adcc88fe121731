#include "parallm/engine/batch_generate.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"
#include "parallm/engine/generate.h"
#include "parallm/engine/plan_transport.h"
#include "parallm/engine/stage_forward.h"
#include "parallm/engine/step_plan.h"
#include "parallm/pipeline/executor.h"
#include "parallm/pipeline/p2p.h"
#include "parallm/pipeline/schedule.h"

namespace parallm {
namespace {

bool is_eos(const ModelConfig& c, int32_t t) {
  return std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), t) != c.eos_token_ids.end();
}

// What the first rank knows of each sequence between steps.
struct SeqState {
  int64_t max_tokens = 0;
  int64_t fed = 0;        // tokens fed so far = position of the next one
  int64_t generated = 0;  // tokens sampled so far
  int32_t next = 0;       // the token it feeds next, once its prompt is in
  bool active = false;
};

// Nanoseconds of the steady clock: the loop's time statistics are integers of one clock, so
// sums of sub-intervals never exceed the interval they lie in.
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Set by request_stop() (a signal handler may call it): lock-free, so async-signal-safe.
std::atomic<bool> g_stop{false};
static_assert(std::atomic<bool>::is_always_lock_free);

}  // namespace

void request_stop() { g_stop.store(true, std::memory_order_relaxed); }
bool stop_requested() { return g_stop.load(std::memory_order_relaxed); }
void clear_stop() { g_stop.store(false, std::memory_order_relaxed); }

BatchResult run_generation(const LlamaModel& model, const comm::Group& tp, const comm::Group& pp,
                           const std::vector<Request>& requests, const BatchOptions& options,
                           const TokenCallback& on_token) {
  return run_generation(model, tp, pp, tp, requests, options, on_token);
}

BatchResult run_generation(const LlamaModel& model, const comm::Group& tp, const comm::Group& pp,
                           const comm::Group& stage_group, const std::vector<Request>& requests,
                           const BatchOptions& options, const TokenCallback& on_token) {
  const ModelConfig& c = model.config();
  const int B = static_cast<int>(requests.size());
  const int P = pp.size(), stage = pp.rank();
  const bool first = stage == 0, last = stage == P - 1;
  // stage_group: every rank of this stage that runs the same plans (the TP group, or TP x EP when
  // EP replicates attention); its rank 0 plans (first stage) and sends the tokens back (last).
  const bool root = first && stage_group.rank() == 0;
  if (B == 0) fail("generate", "no prompts");
  if ((first && !model.has_embedding()) || (last && !model.has_head()))
    fail("generate", "stage ", stage, " of ", P, " holds layers [", model.layer_begin(), ", ",
         model.layer_end(), "): the first stage needs the embedding and the last the head");
  if (options.max_tokens < 0)
    fail("generate", "--max-tokens must be >= 0, got ", options.max_tokens);
  if (options.prefill_chunk < 0)
    fail("generate", "--prefill-chunk must be >= 0, got ", options.prefill_chunk);

  std::vector<SeqState> st(B);
  int64_t capacity = 1;
  for (int i = 0; i < B; ++i) {
    const std::vector<int32_t>& prompt = requests[i].prompt;
    if (prompt.empty()) fail("generate", "prompt ", i + 1, " is empty");
    for (int32_t id : prompt)
      if (id < 0 || id >= c.vocab_size)
        fail("generate", "prompt ", i + 1, ": token id ", id, " is outside the vocabulary [0, ",
             c.vocab_size, ")");
    const int64_t mt = requests[i].max_tokens >= 0 ? requests[i].max_tokens : options.max_tokens;
    const int64_t len = static_cast<int64_t>(prompt.size());
    if (mt < 0) fail("generate", "prompt ", i + 1, ": --max-tokens must be >= 0, got ", mt);
    // Checked: prompt + max_tokens is the KV capacity; a wrapped sum would pass the check below.
    int64_t positions = 0;
    if (__builtin_add_overflow(len, mt, &positions))
      fail("generate", "prompt ", i + 1, " (", len, " tokens) + --max-tokens ", mt,
           " overflows a 64-bit position count");
    if (positions > c.max_position_embeddings)
      fail("generate", "prompt ", i + 1, " (", len, " tokens) + --max-tokens ", mt,
           " exceeds the model's max_position_embeddings ", c.max_position_embeddings);
    capacity = std::max(capacity, positions);
    st[i].max_tokens = mt;
    st[i].active = mt > 0;
  }

  const int M = std::min(options.micro_batches > 0 ? options.micro_batches : P, B);
  auto mb_begin = [&](int j) { return B * j / M; };
  int max_mb = 0;
  for (int j = 0; j < M; ++j) max_mb = std::max(max_mb, mb_begin(j + 1) - mb_begin(j));
  // The most tokens one micro-batch feeds in a step: each of its sequences feeds its first prompt
  // chunk at most (later chunks are no longer, decode tokens are one).
  auto first_chunk = [&](int i) {
    const int64_t len = static_cast<int64_t>(requests[i].prompt.size());
    return options.prefill_chunk > 0 ? std::min(len, options.prefill_chunk) : len;
  };
  int64_t budget = 1;
  for (int j = 0; j < M; ++j) {
    int64_t t = 0;
    for (int i = mb_begin(j); i < mb_begin(j + 1); ++i) t += first_chunk(i);
    budget = std::max(budget, t);
  }
  const int64_t H = c.hidden_size;

  StageForward fwd(model, B, capacity, budget);
  pipeline::StageLink link(pp, StepPlan::wire_size(max_mb, 0));
  if (options.split_pp_hops) link.split_over(stage_group);
  std::vector<Sampler> samplers;
  if (last)
    for (int i = 0; i < B; ++i) samplers.emplace_back(options.sampling, tp);

  BatchResult result;
  result.micro_batches = M;
  result.sequences.resize(B);
  result.kv_cache_bytes = fwd.kv_bytes();
  result.workspace_bytes = fwd.workspace_bytes();

  // Records a sampled token where it is learnt (last stage, and the first rank).
  auto record = [&](int i, int32_t tok) {
    result.sequences[i].tokens.push_back(tok);
    if (is_eos(c, tok) && !options.ignore_eos) result.sequences[i].stopped_at_eos = true;
    if (on_token) on_token(i, tok);
  };
  // The first rank's stop rule: EOS (unless ignored) or the request's own max_tokens.
  auto decide = [&](int i, int32_t tok) {
    SeqState& s = st[i];
    s.next = tok;
    ++s.generated;
    if ((is_eos(c, tok) && !options.ignore_eos) || s.generated >= s.max_tokens) s.active = false;
  };
  // The first rank's plan for micro-batch j.
  auto build_plan = [&](int j) {
    StepPlan plan;
    // A stop from outside: no more work; the loop ends through the usual exit plan.
    if (stop_requested())
      for (SeqState& s : st) s.active = false;
    for (int i = mb_begin(j); i < mb_begin(j + 1); ++i) {
      SeqState& s = st[i];
      if (!s.active) continue;
      const std::vector<int32_t>& prompt = requests[i].prompt;
      const int64_t len = static_cast<int64_t>(prompt.size());
      PlanEntry e{i, s.fed, 1, true};
      if (s.fed < len) {
        const int64_t left = len - s.fed;
        e.n_tokens = options.prefill_chunk > 0 ? std::min(left, options.prefill_chunk) : left;
        e.sample = e.n_tokens == left;
        plan.ids.insert(plan.ids.end(), prompt.begin() + s.fed,
                        prompt.begin() + s.fed + e.n_tokens);
      } else {
        plan.ids.push_back(s.next);
      }
      s.fed += e.n_tokens;
      plan.entries.push_back(e);
    }
    if (j == M - 1)
      plan.exit = std::none_of(st.begin(), st.end(), [](const SeqState& s) { return s.active; });
    return plan;
  };

  // Per micro-batch: the plan in flight on this stage and its activations ([tokens, hidden]: the
  // first stage's own buffer, later stages' the link's buffer for that micro-batch).
  std::vector<StepPlan> plans(M);
  std::vector<std::vector<float>> embedded(first ? M : 0);
  std::vector<pipeline::Activation*> received(M, nullptr);
  std::vector<int> sampled_in_flight(M, 0);  // first rank: tokens due back for each micro-batch
  std::vector<char> has_token(B, 0);         // this rank has seen the sequence's first sample
  int prompts_left = 0;
  for (const SeqState& s : st) prompts_left += s.active;
  std::vector<float> rows, logits;
  std::vector<int32_t> tokens(max_mb);

  auto activations = [&](int j) -> float* {
    return first ? embedded[j].data() : received[j]->data.data();
  };

  const int64_t t0 = now_ns();
  int64_t busy = 0;
  pipeline::StageCallbacks cb;
  set_plan_transport(cb, link, stage, H, plans, received, activations, "generate");
  cb.forward = [&](int j, int) {
    StepPlan& plan = plans[j];
    if (first) {
      if (root) {
        if (P > 1 && sampled_in_flight[j] > 0) {
          // Micro-batch j's tokens from its previous step, in its plan's order.
          TraceSpan wait("recv tokens", "wait");
          link.recv_result(P - 1, j, tokens.data(), sampled_in_flight[j]);
          int k = 0;
          for (const PlanEntry& e : plan.entries)
            if (e.sample) {
              record(e.slot, tokens[k]);
              decide(e.slot, tokens[k++]);
            }
        }
        plan = build_plan(j);
        sampled_in_flight[j] = plan.samples();
      }
      broadcast_plan(plan, stage_group, 0, max_mb, budget);
      const int64_t b = now_ns();
      embedded[j].resize(plan.tokens() * H);
      if (!plan.ids.empty()) {
        fwd.embed(plan.ids.data(), static_cast<int64_t>(plan.ids.size()), embedded[j].data());
        if (options.check_finite)
          check_finite_activations(embedded[j].data(), plan.tokens(), H, "the embedding",
                                   result.steps);
      }
      busy += now_ns() - b;
    }
    const int64_t b = now_ns();
    float* x = activations(j);
    for (const PlanEntry& e : plan.entries) {
      ++result.sequences[e.slot].steps;
      result.sequences[e.slot].tokens_fed += e.n_tokens;
    }
    if (!plan.entries.empty()) fwd.layers(x, plan.chunks(), options.check_finite, result.steps);
    if (last && plan.samples() > 0) {
      // One row of logits per sampled sequence: its chunk's last token.
      TraceSpan span("head+sample", "compute");
      const int64_t V = model.vocab_shard().size();
      const int R = plan.samples();
      rows.resize(R * H);
      logits.resize(R * V);
      int64_t off = 0;
      int r = 0;
      for (const PlanEntry& e : plan.entries) {
        off += e.n_tokens;
        if (e.sample) std::memcpy(&rows[r++ * H], x + (off - 1) * H, H * sizeof(float));
      }
      fwd.head(rows.data(), R, logits.data());
      r = 0;
      for (const PlanEntry& e : plan.entries) {
        if (!e.sample) continue;
        const float* row = logits.data() + r * V;
        // The one check of the default path: a scan of each sampled row before sampling (the
        // sampler would otherwise turn NaN logits into some token without a word).
        for (int64_t v = 0; v < V; ++v)
          if (!std::isfinite(row[v]))
            fail<std::runtime_error>(
                "generate", "step ", result.steps, ": the final logits of sequence ", e.slot + 1,
                " hold a non-finite value (", row[v], " for token id ",
                model.vocab_shard().begin + v, "); rerun with --check-finite to find the layer");
        if (options.collect_logits)
          result.sequences[e.slot].logits.push_back(model.lm_head().gather_logits(row));
        tokens[r++] =
            samplers[e.slot].sample(row, model.vocab_shard().begin, model.vocab_shard().end);
      }
      r = 0;
      for (const PlanEntry& e : plan.entries) {
        if (!e.sample) continue;
        record(e.slot, tokens[r]);
        if (root) decide(e.slot, tokens[r]);  // no pipeline: the first rank samples too
        ++r;
      }
      if (P > 1 && stage_group.rank() == 0) link.send_result(0, j, tokens.data(), R);
    }
    busy += now_ns() - b;
    for (const PlanEntry& e : plan.entries)
      if (e.sample && !has_token[e.slot]) {
        has_token[e.slot] = 1;
        if (--prompts_left == 0) {
          result.prefill_ns = now_ns() - t0;
          result.prefill_busy_ns = busy;
        }
      }
  };

  // Fault injection for the tests of failure handling (tests/cli/generate_hardening_test.cpp):
  // PARALLM_FAULT_AFTER_STEPS=N makes the world's last rank throw after its N-th step, as a rank
  // failing mid-generation would. Unset (always, outside tests) it costs one getenv per call.
  int64_t fault_after = 0;
  if (const char* v = std::getenv("PARALLM_FAULT_AFTER_STEPS")) fault_after = std::atoll(v);
  const bool faulty_rank = last && tp.rank() == tp.size() - 1;

  const pipeline::Schedule schedule = pipeline::gpipe(P, M, /*forward_only=*/true);
  do {
    pipeline::execute_stage(schedule, stage, cb);
    ++result.steps;
    if (fault_after > 0 && faulty_rank && result.steps == fault_after)
      fail<std::runtime_error>("generate", "stage ", stage, " rank ", tp.rank(),
                               ": injected fault after step ", fault_after,
                               " (PARALLM_FAULT_AFTER_STEPS)");
  } while (!plans[M - 1].exit);
  result.wall_ns = now_ns() - t0;
  result.busy_ns = busy;
  result.seconds = result.wall_ns * 1e-9;
  result.busy_seconds = result.busy_ns * 1e-9;
  result.prefill_seconds = result.prefill_ns * 1e-9;
  result.prefill_busy_seconds = result.prefill_busy_ns * 1e-9;
  return result;
}

BatchResult generate_batch(const LlamaModel& model, const comm::Mesh& mesh,
                           const std::vector<Request>& requests, const BatchOptions& options,
                           const TokenCallback& on_token) {
  return run_generation(model, mesh.tp(), mesh.pp(), mesh.tp_ep(), requests, options, on_token);
}

BatchResult generate_batch(const LlamaModel& model, const comm::Mesh& mesh,
                           const std::vector<std::vector<int32_t>>& prompts,
                           const BatchOptions& options) {
  std::vector<Request> requests;
  for (const auto& p : prompts) requests.push_back({p, options.max_tokens});
  return generate_batch(model, mesh, requests, options);
}

}  // namespace parallm
