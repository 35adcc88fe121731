// ShardSpec: which slice of a full dimension a rank owns. Dimensions that do not divide split into
// shards that differ by at most one row (rank r owns [n*r/p, n*(r+1)/p)), so stories260K's FFN of
// 172 runs at TP=8, which Megatron and vLLM do not allow.
// FusedShardSpec: a weight whose rows are several shards stacked (Q/K/V, gate/up), each block
// naming the full tensor and the rows of it that it holds, so a gradient or a checkpoint row of the
// fused weight maps back to the tensor it came from.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace parallm::parallel {

struct ShardSpec {
  int64_t full = 0;   // the whole dimension
  int64_t begin = 0;  // this rank's part: [begin, end)
  int64_t end = 0;
  int64_t size() const { return end - begin; }

  // Near-even split of `full` over `parts`, the part of `index`.
  static ShardSpec even(int64_t full, int parts, int index) {
    return {full, full * index / parts, full * (index + 1) / parts};
  }
  // The largest shard of a near-even split (for padding uneven all-gathers).
  static int64_t max_size(int64_t full, int parts) { return (full + parts - 1) / parts; }
  // The whole dimension, unsplit.
  static ShardSpec whole(int64_t full) { return {full, 0, full}; }
  bool operator==(const ShardSpec&) const = default;
};

// One block of a fused weight: rows [rows.begin, rows.end) of the full tensor `name` (rows.full
// rows), held by `replicas` ranks of the group (KV heads replicated when TP > KV heads: a backward
// pass sums the replicas' gradients of this block, a checkpoint writes it once).
struct FusedPart {
  std::string name;  // the part's role, e.g. "q_proj", "gate_proj"
  ShardSpec rows;
  int replicas = 1;
  bool operator==(const FusedPart&) const = default;
};

// A fused weight's rows: its parts back to back, in order.
struct FusedShardSpec {
  std::vector<FusedPart> parts;

  // A weight of one part (an unfused column-parallel weight).
  static FusedShardSpec single(std::string name, ShardSpec rows, int replicas = 1);

  int64_t size() const;  // rows of the fused weight: the parts' sizes summed
  int64_t full() const;  // rows of the full tensors together
  // Row of the fused weight where part i starts.
  int64_t offset(size_t i) const;
  // The part called `name`; throws std::invalid_argument listing the parts when there is none.
  const FusedPart& part(std::string_view name) const;
  size_t index(std::string_view name) const;
  bool operator==(const FusedShardSpec&) const = default;
};

// How attention heads spread over a TP group. Query heads split evenly (tp must divide them).
// KV heads split evenly when tp <= kv_heads (tp must divide them); when tp > kv_heads each rank
// holds one KV head, replicated over tp / kv_heads ranks (tp must be a multiple of kv_heads),
// as vLLM does, so TP can go up to the number of query heads.
struct HeadPlan {
  int64_t q_begin = 0, q_heads = 0;    // this rank's query heads
  int64_t kv_begin = 0, kv_heads = 0;  // this rank's KV heads (of the full model's numbering)
  int64_t q_total = 0, kv_total = 0;   // the model's heads
  int kv_replicas = 1;                 // ranks holding each of this rank's KV heads

  // Whether tp fits: it divides the query heads, and divides or is a multiple of the KV heads.
  static bool fits(int64_t q_heads, int64_t kv_heads, int tp);
  // Throws std::invalid_argument naming the sizes that would work when tp does not fit.
  static HeadPlan make(int64_t q_heads, int64_t kv_heads, int tp, int rank);
  // The TP sizes that work for these head counts, e.g. "1, 2, 4, 8".
  static std::string valid_sizes(int64_t q_heads, int64_t kv_heads);

  // This rank's rows of q_proj ([q_total * head_dim, hidden]) and of k_proj / v_proj
  // ([kv_total * head_dim, hidden]); also o_proj's input columns (q_rows).
  ShardSpec q_rows(int64_t head_dim) const {
    return {q_total * head_dim, q_begin * head_dim, (q_begin + q_heads) * head_dim};
  }
  ShardSpec kv_rows(int64_t head_dim) const {
    return {kv_total * head_dim, kv_begin * head_dim, (kv_begin + kv_heads) * head_dim};
  }
};

// ---- expert placement over an EP group (mixture of experts, parallel/moe.h) ----
// Experts [begin, end) of EP rank `ep_rank` of `ep`: contiguous, the first experts % ep ranks one
// more. Throws std::invalid_argument (moe_ep_problem's words) when ep does not fit.
ShardSpec expert_range(int64_t experts, int ep, int ep_rank);
// The EP rank that holds `expert`.
int expert_owner(int64_t expert, int64_t experts, int ep);
// Why EP size `ep` cannot split `experts` experts ("" when it can): every rank needs one expert.
std::string moe_ep_problem(int64_t experts, int ep);

}  // namespace parallm::parallel
