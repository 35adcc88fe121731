#include "parallm/engine/serve_loop.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"
#include "parallm/engine/logprobs.h"
#include "parallm/engine/sampler.h"
#include "parallm/engine/plan_transport.h"
#include "parallm/engine/stage_forward.h"
#include "parallm/pipeline/executor.h"
#include "parallm/pipeline/p2p.h"
#include "parallm/pipeline/schedule.h"

namespace parallm::serve {
namespace {

int32_t float_bits(float f) {
  int32_t v;
  std::memcpy(&v, &f, 4);
  return v;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A request's sampling state on the last stage's ranks, from its `init` entry.
struct SlotSampler {
  Sampler sampler;
  int top_logprobs = -1;
};

// The remote-scheduler protocol (tags on the two-rank link): the replica's first rank sends
// {lane, n} then n result values; the front answers {plan values, result values due}, then the
// plan (encoded with its ids).
constexpr int kTagRequest = 31001, kTagPlan = 31002;

}  // namespace

void serve_remote_scheduler(Scheduler& s, const comm::Group& link, const ServeLoopConfig& cfg,
                            const std::function<void()>& on_first) {
  std::vector<int64_t> expected(s.config().lanes, 0);
  std::vector<int32_t> results;
  bool first = true;
  while (true) {
    int64_t head[2];
    link.recv(head, sizeof head, 1, kTagRequest);
    if (first && on_first) on_first();
    first = false;
    const int j = static_cast<int>(head[0]);
    if (j < 0 || j >= s.config().lanes || head[1] != expected[j])
      fail<std::runtime_error>("serve", "remote replica: request for lane ", head[0], " with ",
                               head[1], " results (", j >= 0 && j < s.config().lanes
                                                          ? expected[j] : -1, " due)");
    results.resize(head[1]);
    if (head[1] > 0) link.recv(results.data(), results.size() * sizeof(int32_t), 1, kTagRequest);
    s.complete(j, results.data());
    if (j == 0 && s.idle()) s.wait_for_work(cfg.idle_tick_s);
    const ServePlan plan = s.plan(j);
    expected[j] = s.result_values(j);
    const std::vector<int64_t> v = plan.encode(true);
    const int64_t answer[2] = {static_cast<int64_t>(v.size()), expected[j]};
    link.send(answer, sizeof answer, 1, kTagPlan);
    link.send(v.data(), v.size() * sizeof(int64_t), 1, kTagPlan);
    if (plan.exit) return;
  }
}

void run_serve_loop(const LlamaModel& model, const comm::Group& tp, const comm::Group& pp,
                    const ServeLoopConfig& cfg, Scheduler* scheduler,
                    const std::function<void()>& on_ready, const comm::Group* front) {
  const ModelConfig& c = model.config();
  const int P = pp.size(), stage = pp.rank();
  const bool first = stage == 0, last = stage == P - 1;
  const bool root = first && tp.rank() == 0;
  if (root != (scheduler != nullptr || front != nullptr) || (scheduler && front))
    fail<std::logic_error>("serve",
                           "the first rank and only it runs the scheduler (or reaches it)");
  if ((first && !model.has_embedding()) || (last && !model.has_head()))
    fail("serve", "stage ", stage, " of ", P, " lacks the embedding or the head it needs");
  const int M = P;  // lanes: one plan in flight per stage
  const int64_t H = c.hidden_size;
  const int64_t max_blocks_per_seq = ceil_div(cfg.max_model_len, cfg.block_size);
  // The same bound as Scheduler::max_plan_blocks(), from the same limits on every rank.
  const int64_t max_plan_blocks = ceil_div(cfg.max_num_batched_tokens, cfg.block_size) +
                                  2 * static_cast<int64_t>(cfg.max_num_seqs) + max_blocks_per_seq;
  if (scheduler && (scheduler->config().lanes != M ||
                    scheduler->max_plan_blocks() != max_plan_blocks))
    fail<std::logic_error>("serve", "the scheduler was built for another layout");

  StageForward fwd(model,
                   StageForward::Paged{cfg.num_blocks, cfg.block_size, cfg.max_num_seqs,
                                       max_blocks_per_seq},
                   cfg.max_num_batched_tokens);
  PagedKvCache& kv = *fwd.paged();
  const auto header_max =
      ServePlan::wire_size(cfg.max_num_seqs, max_plan_blocks, 0, cfg.max_num_batched_tokens);
  pipeline::StageLink link(pp, static_cast<int>(header_max));
  if (cfg.split_pp_hops) link.split_over(tp);
  std::vector<std::optional<SlotSampler>> samplers(last ? cfg.max_num_seqs : 0);
  const parallel::VocabExchange vocab(tp);
  const int64_t v_begin = model.vocab_shard().begin, v_end = model.vocab_shard().end;

  std::vector<ServePlan> plans(M);
  std::vector<std::vector<float>> embedded(first ? M : 0);
  std::vector<pipeline::Activation*> received(M, nullptr);
  std::vector<int64_t> expected(M, 0);  // first rank: result values due back per lane
  std::vector<int32_t> results, incoming;
  std::vector<std::vector<int32_t>> pending(front && P == 1 ? M : 0);  // remote, no pipeline
  std::vector<float> rows, logits, lp_rows, lp_logits;
  std::vector<std::vector<int32_t>> prompt_lp;  // per entry: its prompt logprobs' values
  if (on_ready) on_ready();

  auto activations = [&](int j) -> float* {
    return first ? embedded[j].data() : received[j]->data.data();
  };

  pipeline::StageCallbacks cb;
  set_plan_transport(cb, link, stage, H, plans, received, activations, "serve");
  cb.forward = [&](int j, int) {
    ServePlan& plan = plans[j];
    if (first) {
      if (root && front) {
        // The scheduler is the front's: the previous plan's results go there, the plan comes back.
        const std::vector<int32_t>* res = &incoming;
        incoming.resize(expected[j]);
        if (P > 1) {
          if (expected[j] > 0) {
            TraceSpan wait("recv tokens", "wait");
            link.recv_result(P - 1, j, incoming.data(), incoming.size());
          }
        } else {
          res = &pending[j];
        }
        const int64_t head[2] = {j, static_cast<int64_t>(res->size())};
        front->send(head, sizeof head, 0, kTagRequest);
        if (!res->empty()) front->send(res->data(), res->size() * sizeof(int32_t), 0, kTagRequest);
        int64_t answer[2];
        front->recv(answer, sizeof answer, 0, kTagPlan);
        std::vector<int64_t> v(answer[0]);
        front->recv(v.data(), v.size() * sizeof(int64_t), 0, kTagPlan);
        plan = ServePlan::decode(v.data(), v.size());
        expected[j] = answer[1];
      } else if (root) {
        if (P > 1) {
          // Lane j's results from its previous plan, then the lane is free again.
          incoming.resize(expected[j]);
          if (expected[j] > 0) {
            TraceSpan wait("recv tokens", "wait");
            link.recv_result(P - 1, j, incoming.data(), incoming.size());
          }
          scheduler->complete(j, incoming.data());
        }
        if (j == 0 && scheduler->idle()) scheduler->wait_for_work(cfg.idle_tick_s);
        plan = scheduler->plan(j);
        expected[j] = scheduler->result_values(j);
      }
      broadcast_serve_plan(plan, tp, 0, cfg.max_num_seqs, max_plan_blocks,
                           cfg.max_num_batched_tokens);
      embedded[j].resize(plan.tokens() * H);
      if (!plan.ids.empty())
        fwd.embed(plan.ids.data(), static_cast<int64_t>(plan.ids.size()), embedded[j].data());
    }
    // Block tables and, on the last stage, the samplers of requests starting in a slot.
    for (const ServeEntry& e : plan.entries) {
      if (e.init) {
        kv.reset(e.slot);
        if (last) {
          samplers.at(e.slot).emplace(SlotSampler{Sampler(e.sampling, tp), e.top_logprobs});
          samplers[e.slot]->sampler.skip(static_cast<uint64_t>(e.rng_skip));
        }
      }
      kv.append(e.slot, e.blocks.data(), static_cast<int64_t>(e.blocks.size()));
    }
    float* x = activations(j);
    if (!plan.entries.empty()) fwd.layers(x, plan.chunks());
    results.clear();
    // Prompt logprobs: the head over the rows that predict prompt tokens (only the entries that
    // asked), each target's logprob and top list, sent back before the entry's sample.
    prompt_lp.assign(plan.entries.size(), {});
    if (last && plan.targets() > 0) {
      TraceSpan span("prompt logprobs", "compute");
      const int64_t V = v_end - v_begin;
      int64_t off = 0;
      for (size_t k = 0; k < plan.entries.size(); ++k) {
        const ServeEntry& e = plan.entries[k];
        const int64_t nt = static_cast<int64_t>(e.targets.size());
        if (nt > 0) {
          const int64_t first_row = e.lp_first - 1 - e.start_pos;
          if (first_row < 0 || first_row + nt > e.n_tokens)
            fail<std::runtime_error>("serve", "slot ", e.slot, ": prompt logprob targets from ",
                                     e.lp_first, " outside its chunk at ", e.start_pos, " + ",
                                     e.n_tokens);
          lp_rows.resize(nt * H);
          lp_logits.resize(nt * V);
          std::memcpy(lp_rows.data(), x + (off + first_row) * H, nt * H * sizeof(float));
          fwd.head(lp_rows.data(), nt, lp_logits.data());
          if (!samplers.at(e.slot))
            fail<std::runtime_error>("serve", "slot ", e.slot,
                                     " has targets before its init entry");
          const int top = std::max(0, samplers[e.slot]->top_logprobs);
          for (int64_t t = 0; t < nt; ++t) {
            const LogprobResult lp = token_logprobs(vocab, lp_logits.data() + t * V, v_begin,
                                                    v_end, e.targets[t], top);
            prompt_lp[k].push_back(float_bits(lp.logprob));
            for (const auto& c : lp.top) {
              prompt_lp[k].push_back(c.id);
              prompt_lp[k].push_back(float_bits(c.logit));
            }
          }
        }
        off += e.n_tokens;
      }
    }
    if (last && (plan.samples() > 0 || plan.targets() > 0)) {
      TraceSpan span("head+sample", "compute");
      const int64_t V = v_end - v_begin;
      const int R = plan.samples();
      rows.resize(R * H);
      logits.resize(R * V);
      int64_t off = 0;
      int r = 0;
      for (const ServeEntry& e : plan.entries) {
        off += e.n_tokens;
        if (e.sample) std::memcpy(&rows[r++ * H], x + (off - 1) * H, H * sizeof(float));
      }
      if (R > 0) fwd.head(rows.data(), R, logits.data());
      r = 0;
      for (size_t k = 0; k < plan.entries.size(); ++k) {
        const ServeEntry& e = plan.entries[k];
        results.insert(results.end(), prompt_lp[k].begin(), prompt_lp[k].end());
        if (!e.sample) continue;
        const float* row = logits.data() + r++ * V;
        for (int64_t v = 0; v < V; ++v)
          if (!std::isfinite(row[v]))
            fail<std::runtime_error>("serve", "the final logits of slot ", e.slot,
                                     " hold a non-finite value (", row[v], " for token id ",
                                     v_begin + v, ")");
        if (!samplers.at(e.slot))
          fail<std::runtime_error>("serve", "slot ", e.slot, " sampled before its init entry");
        SlotSampler& s = *samplers[e.slot];
        const int32_t tok = s.sampler.sample(row, v_begin, v_end);
        results.push_back(tok);
        if (s.top_logprobs >= 0) {
          const LogprobResult lp =
              token_logprobs(vocab, row, v_begin, v_end, tok, s.top_logprobs);
          results.push_back(float_bits(lp.logprob));
          for (const auto& t : lp.top) {
            results.push_back(t.id);
            results.push_back(float_bits(t.logit));
          }
        }
      }
      if (P > 1 && tp.rank() == 0) link.send_result(0, j, results.data(), results.size());
    }
    if (root && P == 1) {
      if (front)
        pending[j] = results;
      else
        scheduler->complete(j, results.data());
    }
  };

  const pipeline::Schedule schedule = pipeline::gpipe(P, M, /*forward_only=*/true);
  do {
    pipeline::execute_stage(schedule, stage, cb);
  } while (!plans[M - 1].exit);
}

}  // namespace parallm::serve
