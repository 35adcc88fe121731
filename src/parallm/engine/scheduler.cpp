#include "parallm/engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/engine/sampler.h"

namespace parallm::serve {
namespace {

float bits_float(int32_t v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t result_values(int top_logprobs, int32_t vocab_size) {
  if (top_logprobs < 0) return 1;
  return 2 + 2 * static_cast<int64_t>(std::min<int64_t>(top_logprobs, vocab_size));
}

Scheduler::Scheduler(SchedulerConfig config)
    : cfg_(std::move(config)),
      blocks_(cfg_.num_blocks, cfg_.block_size, cfg_.enable_prefix_caching) {
  if (cfg_.lanes < 1 || cfg_.max_num_seqs < 1 || cfg_.max_num_batched_tokens < 1 ||
      cfg_.max_model_len < 1 || cfg_.vocab_size < 1 || cfg_.max_waiting < 0)
    fail("serve", "scheduler: lanes ", cfg_.lanes, ", max_num_seqs ", cfg_.max_num_seqs,
         ", max_num_batched_tokens ", cfg_.max_num_batched_tokens, ", max_model_len ",
         cfg_.max_model_len, ", vocab ", cfg_.vocab_size, ", queue ", cfg_.max_waiting,
         " (each must be >= 1)");
  for (int s = cfg_.max_num_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
  lanes_.resize(cfg_.lanes);
  counters_.kv_blocks_total = cfg_.num_blocks;
  snapshot_ = counters_;
}

int64_t Scheduler::max_blocks_per_seq() const {
  return ceil_div(cfg_.max_model_len, cfg_.block_size);
}

int64_t Scheduler::max_plan_blocks() const {
  // Each entry appends the blocks its chunk reaches into (at most its tokens / block_size + 1);
  // init entries also name the blocks they start with, prefix-cache hits, bounded per plan by
  // one sequence's table (plan() stops admitting past it).
  return ceil_div(cfg_.max_num_batched_tokens, cfg_.block_size) + 2 * cfg_.max_num_seqs +
         max_blocks_per_seq();
}

// ---- any thread

void Scheduler::submit(uint64_t id, Submission s, RequestCallbacks cb) {
  const GenParams& g = s.params;
  const int64_t len = static_cast<int64_t>(s.prompt.size());
  if (len == 0) fail("serve", "prompt: empty (give at least one token)");
  for (int32_t t : s.prompt)
    if (t < 0 || t >= cfg_.vocab_size)
      fail("serve", "prompt: token id ", t, " is outside the vocabulary [0, ", cfg_.vocab_size,
           ")");
  if (g.max_tokens < (g.prompt_logprobs ? 0 : 1))
    fail("serve", "max_tokens: must be >= ", g.prompt_logprobs ? 0 : 1, ", got ", g.max_tokens);
  if (g.prompt_logprobs && g.top_logprobs < 0)
    fail("serve", "top_logprobs: prompt logprobs need top_logprobs >= 0, got ", g.top_logprobs);
  if (g.max_tokens > cfg_.max_model_len || len + g.max_tokens > cfg_.max_model_len)
    fail("serve", "max_tokens: the prompt (", len, " tokens) + max_tokens ", g.max_tokens,
         " exceeds max_model_len ", cfg_.max_model_len);
  if (!(g.temperature >= 0.0f) || !std::isfinite(g.temperature))
    fail("serve", "temperature: must be >= 0, got ", g.temperature);
  if (!(g.top_p > 0.0f && g.top_p <= 1.0f))
    fail("serve", "top_p: must be in (0, 1], got ", g.top_p);
  if (g.top_k < 0) fail("serve", "top_k: must be >= 0, got ", g.top_k);
  if (g.top_logprobs < -1 || g.top_logprobs > 20)
    fail("serve", "top_logprobs: must be in [0, 20] (or -1: no logprobs), got ", g.top_logprobs);
  const int64_t need = ceil_div(len + g.max_tokens, cfg_.block_size);
  if (need > cfg_.num_blocks)
    fail("serve", "max_tokens: the prompt (", len, " tokens) + max_tokens ", g.max_tokens,
         " needs ", need, " KV blocks of ", cfg_.block_size, " positions; the cache has ",
         cfg_.num_blocks, " (raise the KV cache memory)");
  auto r = std::make_unique<Req>();
  r->id = id;
  r->prompt_len = len;
  r->tokens = std::move(s.prompt);
  r->params = g;
  r->cb = std::move(cb);
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    if (failed_) fail<std::runtime_error>("serve", "the engine failed: ", failure_);
    if (stop_called_) fail<std::runtime_error>("serve", "the engine is shutting down");
    int64_t waiting;
    {
      std::lock_guard<std::mutex> s_lock(stats_mu_);
      waiting = snapshot_.waiting;
    }
    if (waiting + inbox_added_ >= cfg_.max_waiting)
      throw QueueFull("serve: the waiting queue is full (" + std::to_string(cfg_.max_waiting) +
                      " requests)");
    inbox_.added.push_back(std::move(r));
    ++inbox_added_;
  }
  inbox_cv_.notify_all();
}

void Scheduler::cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    inbox_.cancelled.push_back(id);
  }
  inbox_cv_.notify_all();
}

void Scheduler::stop() {
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    inbox_.stop = true;
    stop_called_ = true;
  }
  inbox_cv_.notify_all();
}

void Scheduler::fail_all(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    failed_ = true;
    failure_ = why;
  }
  drain_inbox();
  std::vector<Req*> all;
  for (auto& [id, r] : reqs_) all.push_back(r.get());
  for (Req* r : all) finish(r, FinishReason::Error, why);
  for (auto& l : lanes_) l.clear();
  publish();
}

EngineStats Scheduler::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s = snapshot_;
  }
  std::lock_guard<std::mutex> lock(inbox_mu_);
  s.waiting += inbox_added_;
  return s;
}

int64_t Scheduler::load() const {
  const EngineStats s = stats();
  return s.running + s.waiting;
}

// ---- the scheduler's thread

void Scheduler::drain_inbox() {
  Inbox in;
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    std::swap(in, inbox_);
    inbox_added_ = 0;
    // Requests move from the inbox to the waiting queue: publish before the lock goes, so that
    // stats() never misses them in between.
    std::lock_guard<std::mutex> s_lock(stats_mu_);
    snapshot_.waiting += static_cast<int64_t>(in.added.size());
  }
  for (auto& r : in.added) {
    Req* p = r.get();
    reqs_[p->id] = std::move(r);
    waiting_.push_back(p);
  }
  for (uint64_t id : in.cancelled) {
    auto it = reqs_.find(id);
    if (it != reqs_.end()) finish(it->second.get(), FinishReason::Cancelled);
  }
  if (in.stop) stopping_ = true;
  if (stopping_) {
    std::vector<Req*> all;
    for (auto& [id, r] : reqs_) all.push_back(r.get());
    for (Req* r : all) finish(r, FinishReason::Cancelled);
  }
}

bool Scheduler::idle() const {
  if (!running_.empty() || !waiting_.empty() || stopping_) return false;
  for (const auto& l : lanes_)
    if (!l.empty()) return false;
  std::lock_guard<std::mutex> lock(inbox_mu_);
  return inbox_.added.empty() && inbox_.cancelled.empty() && !inbox_.stop;
}

void Scheduler::wait_for_work(double seconds) {
  std::unique_lock<std::mutex> lock(inbox_mu_);
  inbox_cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] {
    return !inbox_.added.empty() || !inbox_.cancelled.empty() || inbox_.stop;
  });
}

bool Scheduler::is_eos(int32_t token) const {
  return std::find(cfg_.eos_token_ids.begin(), cfg_.eos_token_ids.end(), token) !=
         cfg_.eos_token_ids.end();
}

void Scheduler::schedule(Req* r, int64_t n, bool init, ServePlan& plan,
                         std::vector<LaneEntry>& lane) {
  const int64_t bs = cfg_.block_size;
  const int64_t len = static_cast<int64_t>(r->tokens.size());
  ServeEntry e;
  e.slot = r->slot;
  e.start_pos = r->computed;
  e.n_tokens = n;
  e.sample = r->computed + n == len;
  const size_t had = r->blocks.size();
  const int64_t need = ceil_div(r->computed + n, bs) - static_cast<int64_t>(had);
  if (need > 0 && !blocks_.allocate(need, r->blocks))
    fail<std::logic_error>("serve", "scheduler: ", need, " blocks promised but not available");
  if (init) {
    e.init = true;
    e.blocks = r->blocks;
    e.sampling = {r->params.temperature, r->params.top_k, r->params.top_p, r->params.seed};
    e.rng_skip = r->generated;
    e.top_logprobs = r->params.top_logprobs;
  } else {
    e.blocks.assign(r->blocks.begin() + static_cast<int64_t>(had), r->blocks.end());
  }
  if (r->params.prompt_logprobs) {
    // Prompt token t's logprob comes from the row of position t - 1: the targets this chunk's
    // rows predict, inside the prompt, not asked for before.
    const int64_t t0 = std::max(r->computed + 1, r->prompt_lp_next);
    const int64_t t1 = std::min(r->computed + n, r->prompt_len - 1);
    if (t1 >= t0) {
      e.lp_first = t0;
      e.targets.assign(r->tokens.begin() + t0, r->tokens.begin() + t1 + 1);
      r->prompt_lp_next = t1 + 1;
    }
  }
  plan.ids.insert(plan.ids.end(), r->tokens.begin() + r->computed,
                  r->tokens.begin() + r->computed + n);
  // Prompt tokens computed, each counted once (not prefix-cache hits, not recomputation).
  const int64_t p_end = std::min(r->computed + n, r->prompt_len);
  const int64_t p_begin = std::max(r->computed, r->prompt_counted);
  if (p_end > p_begin) {
    counters_.prompt_tokens_total += p_end - p_begin;
    r->prompt_counted = p_end;
  }
  r->computed += n;
  r->in_flight = true;
  if (blocks_.prefix_caching()) {
    // Register the blocks this chunk fills: later plans (on every stage, after this one) may
    // read them for another request.
    for (int64_t b = static_cast<int64_t>(r->hashes.size()); (b + 1) * bs <= r->computed; ++b) {
      const uint64_t parent = b > 0 ? r->hashes[b - 1] : 0;
      const int32_t* toks = r->tokens.data() + b * bs;
      const uint64_t h = BlockManager::chain_hash(parent, toks, bs);
      blocks_.register_full(r->blocks[b], h, parent, toks);
      r->hashes.push_back(h);
    }
  }
  lane.push_back({r->id, e.sample, r->params.top_logprobs, e.lp_first,
                  static_cast<int64_t>(e.targets.size())});
  plan.entries.push_back(std::move(e));
}

void Scheduler::preempt(Req* r) {
  blocks_.release(r->blocks);
  r->blocks.clear();
  r->hashes.clear();
  r->computed = 0;
  free_slots_.push_back(r->slot);
  r->slot = -1;
  running_.erase(std::find(running_.begin(), running_.end(), r));
  waiting_.push_front(r);
  ++counters_.preemptions_total;
}

ServePlan Scheduler::plan(int lane_index) {
  drain_inbox();
  ServePlan plan;
  std::vector<LaneEntry>& lane = lanes_.at(lane_index);
  lane.clear();
  const int64_t bs = cfg_.block_size;
  int64_t budget = cfg_.max_num_batched_tokens;
  bool preempted = false;

  // 1. Running requests not in flight: decode tokens and prompt chunks.
  const std::vector<Req*> order = running_;
  for (Req* r : order) {
    if (budget == 0) break;
    if (r->slot < 0 || r->in_flight) continue;  // preempted in this loop, or in another plan
    const int64_t len = static_cast<int64_t>(r->tokens.size());
    const int64_t n = std::min(len - r->computed, budget);
    const int64_t need = ceil_div(r->computed + n, bs) - static_cast<int64_t>(r->blocks.size());
    while (need > blocks_.available()) {
      // Preempt the latest-admitted request that is not in flight (this one if none else).
      Req* victim = r;
      for (auto it = running_.rbegin(); it != running_.rend(); ++it)
        if (*it != r && !(*it)->in_flight) {
          victim = *it;
          break;
        }
      preempt(victim);
      preempted = true;
      if (victim == r) break;
    }
    if (r->slot < 0) continue;
    schedule(r, n, false, plan, lane);
    budget -= n;
  }

  // 2. Waiting requests, in order, while seats, budget and blocks last.
  int64_t hit_blocks = 0;  // prefix-cache blocks named by this plan (bounded for the wire)
  while (!preempted && !stopping_ && !waiting_.empty() && budget > 0 && !free_slots_.empty()) {
    Req* r = waiting_.front();
    const int64_t len = static_cast<int64_t>(r->tokens.size());
    std::vector<int32_t> hits;
    std::vector<uint64_t> hashes;
    // A request that wants its prompt's logprobs computes every position (no hits).
    const bool lookup = blocks_.prefix_caching() && !r->params.prompt_logprobs;
    if (lookup) {
      // Full blocks only, and never the last token (it must be computed to sample after it).
      const int64_t eligible = (len - 1) / bs;
      counters_.prefix_cache_queries_total += eligible;
      uint64_t parent = 0;
      for (int64_t b = 0; b < eligible; ++b) {
        const int32_t* toks = r->tokens.data() + b * bs;
        const uint64_t h = BlockManager::chain_hash(parent, toks, bs);
        const int32_t blk = blocks_.lookup(h, parent, toks);
        if (blk < 0) break;
        hits.push_back(blk);
        hashes.push_back(h);
        parent = h;
      }
      counters_.prefix_cache_hits_total += static_cast<int64_t>(hits.size());
    }
    const int64_t start = static_cast<int64_t>(hits.size()) * bs;
    const int64_t n = std::min(len - start, budget);
    const int64_t need = ceil_div(start + n, bs) - static_cast<int64_t>(hits.size());
    const bool wire_full = !plan.entries.empty() &&
                           hit_blocks + static_cast<int64_t>(hits.size()) > max_blocks_per_seq();
    if (need > blocks_.available() || wire_full) {
      // Not now: give the hits back (uncounted: the request will look them up again).
      counters_.prefix_cache_hits_total -= static_cast<int64_t>(hits.size());
      if (lookup) counters_.prefix_cache_queries_total -= (len - 1) / bs;
      blocks_.release(hits);
      break;
    }
    hit_blocks += static_cast<int64_t>(hits.size());
    waiting_.pop_front();
    r->slot = free_slots_.back();
    free_slots_.pop_back();
    r->blocks = std::move(hits);
    r->hashes = std::move(hashes);
    r->computed = start;
    running_.push_back(r);
    schedule(r, n, true, plan, lane);
    budget -= n;
  }

  if (lane_index == cfg_.lanes - 1)
    plan.exit = stopping_ && std::all_of(lanes_.begin(), lanes_.end(),
                                         [](const auto& l) { return l.empty(); });
  publish();
  return plan;
}

int64_t Scheduler::result_values(int lane) const {
  int64_t n = 0;
  for (const LaneEntry& e : lanes_.at(lane)) {
    if (e.sample) n += serve::result_values(e.top_logprobs, cfg_.vocab_size);
    n += e.prompt_lps * (serve::result_values(e.top_logprobs, cfg_.vocab_size) - 1);
  }
  return n;
}

void Scheduler::complete(int lane_index, const int32_t* results) {
  std::vector<LaneEntry> lane;
  std::swap(lane, lanes_.at(lane_index));
  const int32_t* v = results;
  for (const LaneEntry& le : lane) {
    auto it = reqs_.find(le.id);
    Req* r = it != reqs_.end() && it->second->slot >= 0 ? it->second.get() : nullptr;
    if (r) r->in_flight = false;
    if (le.prompt_lps > 0) {
      // Before the entry's sample: (logprob, top pairs) per target, in order.
      const int64_t k = std::min<int64_t>(le.top_logprobs, cfg_.vocab_size);
      for (int64_t t = 0; t < le.prompt_lps; ++t) {
        TokenEvent pe;
        pe.logprob = bits_float(v[0]);
        for (int64_t i = 0; i < k; ++i) pe.top.push_back({v[1 + 2 * i], bits_float(v[2 + 2 * i])});
        v += 1 + 2 * k;
        if (!r) continue;
        pe.token = r->tokens.at(le.lp_first + t);
        r->prompt_lp.push_back(std::move(pe));
      }
      if (r && static_cast<int64_t>(r->prompt_lp.size()) == r->prompt_len - 1 &&
          r->cb.on_prompt_logprobs) {
        try {
          r->cb.on_prompt_logprobs(r->prompt_lp);
        } catch (...) {
        }
        r->prompt_lp.clear();
        r->prompt_lp.shrink_to_fit();
      }
    }
    if (!le.sample) continue;
    TokenEvent ev;
    ev.token = v[0];
    if (le.top_logprobs >= 0) {
      ev.logprob = bits_float(v[1]);
      const int64_t k = std::min<int64_t>(le.top_logprobs, cfg_.vocab_size);
      for (int64_t i = 0; i < k; ++i) ev.top.push_back({v[2 + 2 * i], bits_float(v[3 + 2 * i])});
    }
    v += serve::result_values(le.top_logprobs, cfg_.vocab_size);
    if (!r) continue;  // cancelled while in flight
    if (r->params.max_tokens == 0) {  // the prompt only (its logprobs went out above)
      finish(r, FinishReason::Length);
      continue;
    }
    r->tokens.push_back(ev.token);
    ++r->generated;
    ++counters_.generation_tokens_total;
    if (!r->params.ignore_eos && is_eos(ev.token)) {
      finish(r, FinishReason::Stop);
      continue;
    }
    ++r->reported;
    if (r->cb.on_token) {
      try {
        r->cb.on_token(ev);
      } catch (...) {
        // A callback must not stop the engine; the server owns its own failures.
      }
    }
    if (r->generated >= r->params.max_tokens) finish(r, FinishReason::Length);
  }
  publish();
}

void Scheduler::finish(Req* r, FinishReason reason, const std::string& error) {
  if (r->slot >= 0) {
    blocks_.release(r->blocks);
    free_slots_.push_back(r->slot);
    r->slot = -1;
    running_.erase(std::find(running_.begin(), running_.end(), r));
  } else {
    auto w = std::find(waiting_.begin(), waiting_.end(), r);
    if (w != waiting_.end()) waiting_.erase(w);
  }
  ++counters_.requests_finished_total;
  FinishEvent ev;
  ev.reason = reason;
  ev.prompt_tokens = r->prompt_len;
  ev.completion_tokens = r->reported;
  ev.error = error;
  RequestCallbacks cb = std::move(r->cb);
  reqs_.erase(r->id);  // r is gone from here on
  publish();
  if (cb.on_finish) {
    try {
      cb.on_finish(ev);
    } catch (...) {
    }
  }
}

void Scheduler::publish() {
  counters_.running = static_cast<int64_t>(running_.size());
  counters_.running_peak = std::max(counters_.running_peak, counters_.running);
  counters_.waiting = static_cast<int64_t>(waiting_.size());
  counters_.kv_blocks_total = blocks_.num_blocks();
  counters_.kv_blocks_used = blocks_.used();
  counters_.kv_usage =
      static_cast<double>(counters_.kv_blocks_used) / static_cast<double>(blocks_.num_blocks());
  std::lock_guard<std::mutex> lock(stats_mu_);
  snapshot_ = counters_;
}

}  // namespace parallm::serve
