// ServePlan: what one micro-batch does in one step of the serving loop (serve_loop.h): the
// step plan of batch_generate.h (which sequence slots run, from which position, how many tokens,
// whether the last stage samples after them, the ids) plus what serving adds:
//   - block tables: each entry carries the physical KV blocks appended to its slot's table in this
//     step (paged_kv_cache.h); an `init` entry first clears the table (a new request in the slot,
//     or a preempted one restarting), so its list is the whole table so far (prefix-cache hits
//     included). Every rank applies the same lists in the same order and holds the same tables;
//   - per-request sampling: an `init` entry carries the request's sampling parameters, its
//     logprobs count and how many draws its generator has already made (a request restarted
//     after preemption continues its random stream where it stopped);
//   - `exit`: the explicit stop message; every rank leaves the loop after this step.
// Rank 0 broadcasts it over the first stage's TP group (broadcast_serve_plan, fixed size) and
// each stage sends it without the ids as the header of its activations to the next stage.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/engine/sampler.h"
#include "parallm/model/llama.h"

namespace parallm {

struct ServeEntry {
  int slot = 0;
  int64_t start_pos = 0;
  int64_t n_tokens = 0;
  bool sample = false;
  bool init = false;
  // init only:
  SamplingParams sampling;
  int64_t rng_skip = 0;   // draws the request's generator made before (preemption)
  int top_logprobs = -1;  // -1: no logprobs
  std::vector<int32_t> blocks;  // appended to the slot's block table
  // Prompt logprobs: the last stage returns the logprob (and top_logprobs list) of targets[k],
  // prompt token lp_first + k, from the row of position lp_first + k - 1 (inside this chunk).
  int64_t lp_first = 0;
  std::vector<int32_t> targets;
};

struct ServePlan {
  std::vector<ServeEntry> entries;
  std::vector<int32_t> ids;  // the tokens fed, entries back to back (first stage only)
  bool exit = false;

  int64_t tokens() const;
  int samples() const;
  int64_t blocks() const;  // block ids over all entries
  int64_t targets() const;  // prompt-logprob targets over all entries
  std::vector<SeqChunk> chunks() const;

  std::vector<int64_t> encode(bool with_ids) const;
  // Throws std::runtime_error naming the value when `v` is not a plan.
  static ServePlan decode(const int64_t* v, size_t n);
  static int64_t wire_size(int64_t max_entries, int64_t max_blocks, int64_t max_ids,
                           int64_t max_targets = 0);
};

// rank `root` of `tp` -> every rank, in one message of wire_size(limits) values (targets are
// bounded by max_ids: a plan's targets are some of its tokens).
void broadcast_serve_plan(ServePlan& plan, const comm::Group& tp, int root, int64_t max_entries,
                          int64_t max_blocks, int64_t max_ids);

}  // namespace parallm
