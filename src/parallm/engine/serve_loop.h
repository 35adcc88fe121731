// The serving loop on one rank: the generation loop of batch_generate.h, fed by a Scheduler
// instead of a fixed batch, over a paged KV cache, until the scheduler's exit message.
//
// Rank roles (one replica: a TP x PP group):
//   - the first rank (first stage, TP rank 0) owns the Scheduler: at each micro-batch of each
//     step it takes the sampled tokens of that micro-batch's previous plan (from the last stage,
//     or its own sampling without pipeline), hands them to the scheduler, asks it for the next
//     plan and broadcasts it over the first stage's TP group;
//   - every stage runs each plan as it comes (with its activations from the previous stage):
//     applies the plan's block tables to its paged cache, runs its layers, and the last stage's
//     TP ranks sample each request with its own Sampler (created on the request's `init` entry,
//     seeded by the request) and compute logprobs; the last stage's TP rank 0 sends the results
//     back to the first rank;
//   - with as many micro-batches (lanes) as stages, every stage has a plan in flight.
// The loop ends on the plan that says `exit` (the scheduler sends it after stop(): the explicit
// stop message, so no rank waits forever). When idle the first rank waits for requests, but sends
// an empty plan every idle_tick_s so that waiting ranks stay inside their comm timeout.
#pragma once

#include <cstdint>
#include <functional>

#include "parallm/comm/group.h"
#include "parallm/engine/scheduler.h"
#include "parallm/model/llama.h"

namespace parallm::serve {

struct ServeLoopConfig {
  int max_num_seqs = 64;
  int64_t max_num_batched_tokens = 512;
  int64_t block_size = 16;
  int64_t num_blocks = 0;
  int64_t max_model_len = 0;
  double idle_tick_s = 0.5;
  bool split_pp_hops = false;  // activations cross between stages in 1/TP blocks (--pp-split)
};

// On every rank of tp x pp. scheduler: the replica's scheduler on its first rank (built with
// lanes = pp.size() and the same limits), null on the others. on_ready: called once the rank's
// cache is allocated and its loop starts. front: DP under mpirun, on the first rank of a replica
// whose scheduler lives in world rank 0's process (then scheduler is null): a two-rank group,
// rank 0 the front running serve_remote_scheduler for this replica, rank 1 this rank. At each
// micro-batch it sends the front the previous plan's results and receives the next plan.
void run_serve_loop(const LlamaModel& model, const comm::Group& tp, const comm::Group& pp,
                    const ServeLoopConfig& config, Scheduler* scheduler,
                    const std::function<void()>& on_ready = nullptr,
                    const comm::Group* front = nullptr);

// The front's side of `front` above (rank 0 of `link`), on a thread of world rank 0's process:
// answers the remote first rank's requests from `scheduler` (complete, plan) until it has sent
// the exit plan. on_first: called when the first request arrives (that replica's loop runs).
void serve_remote_scheduler(Scheduler& scheduler, const comm::Group& link,
                            const ServeLoopConfig& config, const std::function<void()>& on_first);

}  // namespace parallm::serve
