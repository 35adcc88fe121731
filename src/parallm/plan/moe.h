// The bytes the engine's expert parallelism moves (parallel::MoeLayer::forward), counted as
// comm::CommStats counts them: what each rank of the EP group puts on the wire, its sends to itself
// excluded. One MoE layer, one engine step of T tokens (every rank of the TP x EP block holds the
// same T tokens; attention is replicated over EP):
//
//   EP rank r takes T_r = ShardSpec::even(T, EP, r) of them and, summed over the EP group,
//   counts    all-to-all of one i64 per rank:        EP (EP - 1) x 8
//   dispatch  all-to-all-v of the rows sent to another rank, each H + 2 f32 (hidden vector,
//             routing weight, expert id):             off x (H + 2) x 4
//   combine   the same rows back, H f32 each:        off x H x 4
//   gather    all-gather of the outputs over EP, padded to the largest T_r:
//                                                    EP (EP - 1) x ceil(T / EP) x H x 4
//   where `off` is the rows (token, chosen expert) routed to an expert another EP rank holds.
// Only `off` depends on the routing; the planner's expectation for it assumes the router spreads
// tokens evenly over the experts (each of the k choices lands on EP rank q with probability
// n_q / E, n_q its experts): off = sum_r T_r k (1 - n_r / E). Given the real count (MoeLayer::
// rows_sent, --moe-stats), the bytes are exact. The counts and the padding make a step's bytes
// not proportional to T, so bytes per token are per step: a decode step of n sequences is T = n, a
// prefill chunk T = its prompt tokens. Under TP each TP rank has its own EP group doing the same
// exchange (--comm-stats' "ep" row sums TP of them).
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/model/config.h"

namespace parallm::plan {

struct MoeStepBytes {
  double counts = 0, dispatch = 0, combine = 0, gather = 0;
  double all_to_all() const { return counts + dispatch + combine; }
  double total() const { return all_to_all() + gather; }
};

// Rows of a step of T tokens routed off their EP rank when the router spreads them evenly.
double moe_expected_off_rank_rows(const ModelConfig& c, int ep, int64_t T);

// Bytes one EP group sends for one MoE layer and one step of T tokens, `off_rank_rows` as above
// (a negative value: moe_expected_off_rank_rows). Throws std::invalid_argument naming the value
// when the model is dense, EP does not fit its experts (parallel::moe_ep_problem) or T < 0.
MoeStepBytes moe_step_bytes(const ModelConfig& c, int ep, int64_t T, double off_rank_rows = -1);

// Sparse layers among [layer_begin, layer_end) (qwen2_moe's mlp_only_layers and
// decoder_sparse_step leave dense ones): each does one MoeLayer::forward per step.
int64_t moe_layers(const ModelConfig& c, int64_t layer_begin, int64_t layer_end);
// Those of pipeline stage `stage` of `pp` (pipeline::partition_layers).
int64_t stage_moe_layers(const ModelConfig& c, int pp, int stage);

// A run of steps (T per step) through `layers` sparse layers, its rows routed off-rank summed over
// layers and steps (`off_rank_rows`, linear in the bytes): what --comm-stats counts for the EP
// group, summed over its ranks. Per token: divide by the steps' tokens.
MoeStepBytes moe_run_bytes(const ModelConfig& c, int ep, const std::vector<int64_t>& step_tokens,
                           int64_t layers, double off_rank_rows);

// vLLM's --enable-expert-parallel layout (parallel::MoeMode::AllReduce: whole experts over the TP
// ranks, no dispatch): one MoE layer, one step of T tokens is one all-reduce of the [T, k, H] f32
// slots over the TP ranks (group "ep_tp"): `payload` = T k H 4 bytes, whatever the routing, and
// `sent` = 2 (TP-1) floor(payload / TP), what --comm-stats counts each rank sending for it (a
// ring's reduce-scatter + all-gather; the native path is counted the same way). Both 0 at TP 1 (no
// call). Nothing else moves for the MoE layer: no counts, no dispatch, no gather.
struct MoeAllReduceBytes {
  double payload = 0, sent = 0;
};
MoeAllReduceBytes moe_all_reduce_step_bytes(const ModelConfig& c, int tp, int64_t T);

}  // namespace parallm::plan
