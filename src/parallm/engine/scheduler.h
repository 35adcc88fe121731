// Scheduler: the continuous-batching scheduler of one serving replica, on its first rank (world
// rank 0 of the replica). Iteration-level scheduling (Orca, vLLM's V1 policy): every plan it
// builds (one per micro-batch, `lane`, of each step) takes
//   1. the running requests not in flight, in arrival order: a decode token each, or the next
//      chunk of a prompt still being computed, within the step's token budget
//      (max_num_batched_tokens); when the KV cache lacks a block, the latest-admitted running
//      request not in flight is preempted (its blocks freed; it goes back to the front of the
//      waiting queue with prompt + generated tokens as its prompt, recomputed later);
//   2. then, unless something was preempted, waiting requests in order while seats
//      (max_num_seqs), budget and blocks last; with prefix caching a request's leading full
//      blocks are looked up first and only the rest is computed.
// Under pipeline parallelism there are as many lanes as stages, each with a plan in flight; a
// request is in at most one in-flight plan (it is scheduled again only once that plan's results
// came back), so its tokens stay in order.
//
// The scheduler knows tokens and blocks only; the serving loop (serve_loop.h) runs its plans and
// hands each lane's sampled tokens back (complete()). Requests arrive from any thread (submit,
// cancel: a mutex-guarded inbox drained at every plan); callbacks run on the scheduler's thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "parallm/engine/block_manager.h"
#include "parallm/engine/serve_engine.h"
#include "parallm/engine/serve_plan.h"

namespace parallm::serve {

struct SchedulerConfig {
  int lanes = 1;  // plans in flight: the pipeline stages
  int max_num_seqs = 64;
  int64_t max_num_batched_tokens = 512;  // tokens per plan
  int64_t block_size = 16;
  int64_t num_blocks = 0;
  bool enable_prefix_caching = false;
  int64_t max_model_len = 0;
  int64_t max_waiting = 1024;  // submit() throws QueueFull past this many waiting requests
  int32_t vocab_size = 0;
  std::vector<int64_t> eos_token_ids;
};

// Values the last stage sends back per sampled entry: the token, then with logprobs its logprob
// and top_logprobs (id, logprob) pairs (floats as their bits); top is capped at the vocabulary.
int64_t result_values(int top_logprobs, int32_t vocab_size);

class Scheduler {
 public:
  explicit Scheduler(SchedulerConfig config);

  // ---- any thread
  // Validates (std::invalid_argument naming the parameter), throws QueueFull, or queues.
  void submit(uint64_t id, Submission s, RequestCallbacks cb);
  void cancel(uint64_t id);
  // Shutdown: every request finishes Cancelled, then the plans carry the exit message.
  void stop();
  // The loop failed (or ended): every request left finishes with Error(why); submit() throws.
  void fail_all(const std::string& why);
  EngineStats stats() const;
  int64_t load() const;  // running + waiting, for the DP front's choice

  // ---- the scheduler's thread (the replica's first rank)
  ServePlan plan(int lane);
  int64_t result_values(int lane) const;  // what the last stage sends back for lane's plan
  // The lane's sampled results (result_values(lane) values, null when none): records tokens,
  // finishes requests, and takes the lane's requests out of flight.
  void complete(int lane, const int32_t* results);
  // True when nothing is running, waiting, arriving or in flight.
  bool idle() const;
  // Blocks until a request, cancel or stop arrives, or `seconds` pass.
  void wait_for_work(double seconds);

  // Wire limits of the plans it builds.
  int64_t max_blocks_per_seq() const;
  int64_t max_plan_blocks() const;
  const SchedulerConfig& config() const { return cfg_; }

 private:
  struct Req {
    uint64_t id = 0;
    std::vector<int32_t> tokens;  // prompt + generated
    int64_t prompt_len = 0;       // of the original prompt
    GenParams params;
    RequestCallbacks cb;
    int64_t computed = 0;   // positions whose KV is (or is being) computed
    int64_t generated = 0;  // tokens sampled
    int64_t reported = 0;   // tokens passed to on_token
    int64_t prompt_counted = 0;  // prompt positions counted in prompt_tokens_total
    std::vector<int32_t> blocks;
    std::vector<uint64_t> hashes;  // chain hashes of its registered full blocks
    int slot = -1;                 // -1: waiting
    bool in_flight = false;
    // Prompt logprobs: the next prompt token whose logprob no plan asked for yet (a request
    // recomputed after preemption does not ask again), and those received so far.
    int64_t prompt_lp_next = 1;
    std::vector<TokenEvent> prompt_lp;
  };
  struct LaneEntry {
    uint64_t id = 0;
    bool sample = false;
    int top_logprobs = -1;
    int64_t lp_first = 0, prompt_lps = 0;  // prompt-logprob targets in this plan
  };
  struct Inbox {
    std::vector<std::unique_ptr<Req>> added;
    std::vector<uint64_t> cancelled;
    bool stop = false;
  };

  void drain_inbox();
  void schedule(Req* r, int64_t n, bool init, ServePlan& plan, std::vector<LaneEntry>& lane);
  void preempt(Req* r);
  void finish(Req* r, FinishReason reason, const std::string& error = {});
  bool is_eos(int32_t token) const;
  void publish();  // copies the counters into the snapshot stats() reads

  SchedulerConfig cfg_;
  BlockManager blocks_;

  // Owned by the scheduler's thread.
  std::unordered_map<uint64_t, std::unique_ptr<Req>> reqs_;
  std::deque<Req*> waiting_;
  std::vector<Req*> running_;  // admission order
  std::vector<int> free_slots_;
  std::vector<std::vector<LaneEntry>> lanes_;
  bool stopping_ = false;
  EngineStats counters_;

  mutable std::mutex inbox_mu_;
  std::condition_variable inbox_cv_;
  Inbox inbox_;
  int64_t inbox_added_ = 0;  // inbox_.added.size(), for load()
  bool failed_ = false, stop_called_ = false;
  std::string failure_;

  mutable std::mutex stats_mu_;
  EngineStats snapshot_;
};

}  // namespace parallm::serve
