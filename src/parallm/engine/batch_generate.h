// The generation loop: one loop for every layout, from one sequence on one rank to a batch through
// a pipeline of stages, each stage a tensor-parallel group. `generate()` (generate.h) is its
// batch-of-one case.
//
// Each step, the first rank (world rank 0: first stage, TP rank 0) builds a StepPlan per
// micro-batch (step_plan.h): which sequences run and how many tokens each feeds (a prompt chunk of
// at most prefill_chunk tokens, or one decode token). A sequence that finishes (EOS, or its own
// max_tokens) is left out of every later plan: its forward work stops, the others go on. The plan
// is the only per-step knowledge the other ranks need; they learn it as follows.
//
// The batch is cut into micro-batches that flow through the stages by the GPipe forward-only
// schedule (pipeline/schedule.h), run by the pipeline executor: stage s works on micro-batch j
// while stage s+1 works on j-1. Decode keeps the pipeline full across steps: the last stage's
// first TP rank sends micro-batch j's sampled tokens straight back to the first rank
// (pipeline::StageLink), which plans j's next step while the later micro-batches of this step are
// still in flight, so with micro-batches >= stages no stage waits between steps. For that the plan
// must not need a world-wide synchronisation per step (it would drain the pipeline every step):
//   - on the first stage, rank 0 broadcasts plan (j, step) over its TP group (broadcast_plan: the
//     loop's one collective; a no-op without TP);
//   - every TP rank then sends the plan, as the header of micro-batch j's activations, to the same
//     TP rank of the next stage: activations are replicated across a TP group, so each TP rank
//     already has its own link to the next stage, and the plan arrives with the data it describes,
//     with no extra message and no wait for any stage but the previous one.
// The loop ends with a pass whose plans are empty and whose last plan says `exit` (rank 0 builds
// it once no sequence is active; every rank sees it with micro-batch M-1 and leaves).
//
// Sampling is seeded per sequence exactly as a run of that prompt alone, and a sequence's tokens
// do not depend on which others share its steps, so a batched run gives each prompt the tokens it
// gets alone.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "parallm/comm/mesh.h"
#include "parallm/engine/sampler.h"
#include "parallm/model/llama.h"

namespace parallm {

// One request: its prompt and its own options.
struct Request {
  std::vector<int32_t> prompt;
  int64_t max_tokens = -1;  // tokens to generate; -1: BatchOptions::max_tokens
};

struct BatchOptions {
  int64_t max_tokens = 64;  // for requests that do not say
  bool ignore_eos = false;
  SamplingParams sampling;
  int micro_batches = 0;        // 0: as many as pipeline stages (capped at the batch size)
  int64_t prefill_chunk = 0;    // feed prompts at most this many tokens per step; 0: whole prompts
  bool collect_logits = false;  // full-vocab logits of every step (last stage's ranks)
  // Scan the activations after the embedding and after every layer, and fail naming the layer
  // where a non-finite value first appeared (--check-finite). Without it only the sampled rows of
  // the final logits are scanned, once per step: non-finite logits are always an error.
  bool check_finite = false;
  // Activations cross between stages in blocks over the stage's group (pipeline::StageLink::
  // split_over; --pp-split, resolved into RankContext::split_pp_hops). The same on every rank.
  bool split_pp_hops = false;
};

struct SequenceOutput {
  std::vector<int32_t> tokens;             // generated, not including the prompt
  std::vector<std::vector<float>> logits;  // collect_logits, on the last stage
  bool stopped_at_eos = false;
  // The forward work of this sequence on this rank (every rank runs every plan): the steps it
  // took part in and the tokens it fed.
  int64_t steps = 0;
  int64_t tokens_fed = 0;
};

struct BatchResult {
  // tokens and stopped_at_eos: complete on the last stage's ranks and on the first rank (from the
  // last stage's results); empty elsewhere.
  std::vector<SequenceOutput> sequences;
  int micro_batches = 0;
  int64_t steps = 0;        // pipeline passes, the closing empty one included
  double seconds = 0;       // the whole generation, on this rank
  double busy_seconds = 0;  // this rank's compute (embedding, layers, head, sampling)
  // Until this rank's part of the prompt pass was done (its forward of the last prompt chunk that
  // ends a prompt); the largest over ranks, the last stage's, ends the prompt pass.
  double prefill_seconds = 0;
  double prefill_busy_seconds = 0;  // this rank's compute until then
  // The same four in integer nanoseconds of one steady clock, from this rank's own start: busy is
  // a sum of disjoint intervals inside [start, end], so busy_ns <= wall_ns and prefill_busy_ns <=
  // prefill_ns exactly (the shares printed from them cannot leave [0, 100%]).
  int64_t wall_ns = 0, busy_ns = 0, prefill_ns = 0, prefill_busy_ns = 0;
  uint64_t kv_cache_bytes = 0;      // this rank's KV cache
  uint64_t workspace_bytes = 0;     // this rank's activation workspace (model/workspace.h)
};

// Called with (sequence, token) on each rank that learns a token: the last stage's ranks as they
// sample it, and the first rank. Without pipeline stages that is every rank, once per token.
using TokenCallback = std::function<void(int sequence, int32_t token)>;

// A stop asked for from outside the loop (a signal handler: only sets a flag, async-signal-safe).
// The first rank sees it when it plans the next step and plans no more work: the loop ends as if
// every sequence had finished, so each keeps the tokens generated so far. Cleared by clear_stop().
void request_stop();
bool stop_requested();
void clear_stop();

// The loop on one rank: tp is this stage's TP group (the model's), pp this TP rank's pipeline
// group (one rank per stage; the size-1 group without pipeline). Every rank of tp x pp calls it
// with the same requests and options.
BatchResult run_generation(const LlamaModel& model, const comm::Group& tp, const comm::Group& pp,
                           const std::vector<Request>& requests, const BatchOptions& options,
                           const TokenCallback& on_token = nullptr);
// The same where more ranks than tp run each plan: stage_group holds every rank of this stage
// that runs the same plans (TP x EP under expert parallelism, mesh.tp_ep()); tp stays the LM
// head's and the sampler's group.
BatchResult run_generation(const LlamaModel& model, const comm::Group& tp, const comm::Group& pp,
                           const comm::Group& stage_group, const std::vector<Request>& requests,
                           const BatchOptions& options, const TokenCallback& on_token = nullptr);

// The same over a mesh's TP, PP and stage groups.
BatchResult generate_batch(const LlamaModel& model, const comm::Mesh& mesh,
                           const std::vector<Request>& requests, const BatchOptions& options,
                           const TokenCallback& on_token = nullptr);
// Every prompt with options.max_tokens.
BatchResult generate_batch(const LlamaModel& model, const comm::Mesh& mesh,
                           const std::vector<std::vector<int32_t>>& prompts,
                           const BatchOptions& options);

}  // namespace parallm
