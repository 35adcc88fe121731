// StepPlan: what one micro-batch does in one step of the generation loop. The first rank (world
// rank 0: first stage, TP rank 0) owns the requests and builds every plan; the plan is the only
// thing the other ranks need to know about the batch:
//   - which sequences run (the KV-cache slot of each), from which position, how many tokens each
//     feeds (a prompt chunk, or one decode token), and whether the last stage samples a token
//     after it (no for a prompt chunk that is not the prompt's last);
//   - the token ids fed (the first stage embeds them; later stages do not need them);
//   - `exit`: the batch is done, every rank leaves the loop after this step.
//
// How it reaches the ranks (see batch_generate.h for why this drains nothing): rank 0 broadcasts
// it over the first stage's TP group (broadcast_plan, the loop's only collective); each TP rank of
// a stage then sends it, without the ids, as the header of its activations to the same TP rank of
// the next stage (pipeline::StageLink), so every rank of every stage learns the plan of micro-batch
// j exactly when j's activations arrive.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/model/llama.h"

namespace parallm {

struct PlanEntry {
  int slot = 0;           // sequence (KV-cache slot) index in the batch
  int64_t start_pos = 0;  // position of the first token fed
  int64_t n_tokens = 0;   // tokens fed this step
  bool sample = false;    // the last stage samples this sequence's next token after the step
};

struct StepPlan {
  std::vector<PlanEntry> entries;
  std::vector<int32_t> ids;  // the tokens fed, entries back to back (first stage only)
  bool exit = false;

  int64_t tokens() const;                // sum of n_tokens
  int samples() const;                   // entries with sample
  std::vector<SeqChunk> chunks() const;  // the entries as the model takes them

  // Flat form: [exit, entries, ids, (slot, start_pos, n_tokens, sample) per entry, ids...].
  // with_ids false leaves the ids out (what later stages receive).
  std::vector<int64_t> encode(bool with_ids) const;
  // Throws std::runtime_error naming the value when `v` is not a plan.
  static StepPlan decode(const int64_t* v, size_t n);
  // Values of the flat form for at most `max_entries` entries and `max_ids` ids.
  static int wire_size(int max_entries, int64_t max_ids);
};

// The step-plan broadcast: `plan` from `root` to every rank of `tp`, in one fixed-size message of
// wire_size(max_entries, max_ids) values (every rank passes the same limits).
void broadcast_plan(StepPlan& plan, const comm::Group& tp, int root, int max_entries,
                    int64_t max_ids);

}  // namespace parallm
