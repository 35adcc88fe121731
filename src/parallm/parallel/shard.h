// ShardSpec: which slice of a full dimension a rank owns. Dimensions that do not divide split into
// shards that differ by at most one row (rank r owns [n*r/p, n*(r+1)/p)), so stories260K's FFN of
// 172 runs at TP=8, which Megatron and vLLM do not allow.
#pragma once

#include <cstdint>
#include <string>

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
};

// How attention heads spread over a TP group. Query heads split evenly (tp must divide them).
// KV heads split evenly when tp <= kv_heads (tp must divide them); when tp > kv_heads each rank
// holds one KV head, replicated over tp / kv_heads ranks (tp must be a multiple of kv_heads),
// as vLLM does, so TP can go up to the number of query heads.
struct HeadPlan {
  int64_t q_begin = 0, q_heads = 0;    // this rank's query heads
  int64_t kv_begin = 0, kv_heads = 0;  // this rank's KV heads (of the full model's numbering)

  // Throws std::invalid_argument naming the sizes that would work when tp does not fit.
  static HeadPlan make(int64_t q_heads, int64_t kv_heads, int tp, int rank);
  // The TP sizes that work for these head counts, e.g. "1, 2, 4, 8".
  static std::string valid_sizes(int64_t q_heads, int64_t kv_heads);
};

}  // namespace parallm::parallel
