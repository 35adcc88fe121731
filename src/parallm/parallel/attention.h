// ParallelAttention: causal grouped-query attention split by heads over a TP group.
//
//   xn [T, hidden] -> qkv = ColumnParallel(W_qkv) xn   [T, (q_heads + 2 kv_heads) * head_dim]
//                  -> rope(q), rope(k); k, v into the KV store; attention over the cached positions
//                  -> out = RowParallel(W_o) attn       [T, hidden], one all-reduce
//
// Q, K and V are fused into one column-parallel GEMM (plus, for Qwen2, a bias on its rows, added
// before RoPE; inference only); its FusedShardSpec names the rows of
// q_proj / k_proj / v_proj each block holds. Query heads split evenly; KV heads split evenly when
// TP <= KV heads and are replicated over TP / KV heads ranks otherwise (parallel::HeadPlan).
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/kernels/ops.h"
#include "parallm/parallel/linear.h"
#include "parallm/parallel/shard.h"
#include "parallm/parallel/train_mode.h"

namespace parallm::parallel {

// Where a rank's keys and values live: the engine's KV caches implement this. Two layouts:
//  - contiguous (block_size() == 0): position p of local KV head h of layer l (counted within this
//    rank's layers) for sequence `slot` is at keys(l, slot) + p * kv_stride() + h * head_dim;
//  - paged (block_size() > 0, vLLM's design): keys(l, slot) and values(l, slot) are layer l's
//    block pools (the same for every slot), and position p of `slot` is pool row
//    block_table(slot)[p / block_size()] * block_size() + p % block_size(); the table holds
//    table_blocks(slot) entries, so the slot covers table_blocks(slot) * block_size() positions.
class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual float* keys(int64_t layer, int slot) = 0;
  virtual float* values(int64_t layer, int slot) = 0;
  virtual int64_t kv_stride() const = 0;
  virtual int64_t capacity() const = 0;  // positions per sequence (the most, when paged)
  virtual int64_t block_size() const { return 0; }
  virtual const int32_t* block_table(int /*slot*/) const { return nullptr; }
  virtual int64_t table_blocks(int /*slot*/) const { return 0; }
};

// A run of consecutive tokens of one sequence inside a batch.
struct SeqChunk {
  int slot = 0;           // which sequence (KV cache slot)
  int64_t start_pos = 0;  // position of the chunk's first token
  int64_t n_tokens = 0;
};

struct RopeSpec {
  std::vector<float> inv_freq;  // [head_dim / 2]
  kernels::RopeStyle style = kernels::RopeStyle::HalfSplit;
};

// What the training forward keeps for the backward, what a deferred backward keeps for
// backward_weight(), and the scratch of each call; owned by the caller, one per (micro-batch,
// layer) state, reused. Local sizes: qd = q_heads * head_dim, kvd = kv_heads * head_dim of this
// rank; w = qd + 2 kvd; T = B*S, all the tokens (also under sequence parallelism).
//
// Kept from forward_train() to backward(): q, k, v, attn, and probs unless recompute_probs.
// Kept from backward() to backward_weight() (defer_weight_grads only): attn, wgrad_dqkv,
// wgrad_dout (q, k, v and probs are free once backward() returns).
// Everything else is scratch, clobbered by each call and never read across calls: the caller may
// lend one shared set to every state (swap the vectors in before a call and out after).
struct AttentionCache {
  // ---- kept forward -> backward
  std::vector<float> q;      // [T, qd] after RoPE
  std::vector<float> k, v;   // [T, kvd], k after RoPE
  std::vector<float> probs;  // [B, q_heads, S, S]: the softmax of each head; empty (size 0)
                             // under recompute_probs, where the backward recomputes it
  std::vector<float> attn;   // [T, qd]: the attention output (o_proj's input); also kept -> W
  // ---- kept backward -> backward_weight (defer_weight_grads; empty otherwise)
  std::vector<float> wgrad_dqkv;  // [T, w]: the gradient of the fused Q/K/V output
  std::vector<float> wgrad_dout;  // [T, hidden]: the output's gradient (all rows under SP)
  // ---- scratch
  std::vector<float> qkv;    // [T, w]: the column-parallel output, then the backward's dqkv
  std::vector<float> xg;     // [T, hidden] under SP: the gathered input, the partial output, the
                             // partial input gradient in turn
  std::vector<float> dout;   // [T, hidden] under SP without defer: the gathered output gradient
  std::vector<float> seq;    // the sequence mappings' staging (uneven row splits)
  std::vector<float> dattn, dq, dk, dv;  // [T, qd], [T, qd], [T, kvd], [T, kvd]
  std::vector<int32_t> positions;        // [T]: 0..S-1 for each sequence
};

class ParallelAttention {
 public:
  ParallelAttention() = default;
  // qkv: [qkv_spec(heads, head_dim).size(), hidden], this rank's q rows, then k rows, then v rows;
  // o: [hidden, heads.q_heads * head_dim], this rank's input columns of o_proj.
  // qkv_bias: empty (no bias, LLaMA) or one float per row of qkv, the same rows of the q_proj,
  // k_proj and v_proj biases (Qwen2). forward() adds it; forward_train() refuses a biased layer.
  ParallelAttention(RowBlocks qkv, Tensor o, const HeadPlan& heads, int64_t head_dim, RopeSpec rope,
                    comm::Group group, std::vector<float> qkv_bias = {});

  // The fused Q/K/V rows a rank holds: parts "q_proj", "k_proj", "v_proj" (k and v with
  // heads.kv_replicas replicas).
  static FusedShardSpec qkv_spec(const HeadPlan& heads, int64_t head_dim);
  // o_proj's input columns a rank holds (its query heads).
  static ShardSpec o_spec(const HeadPlan& heads, int64_t head_dim) {
    return heads.q_rows(head_dim);
  }
  // Scratch floats forward() needs for T tokens.
  static int64_t scratch_floats(const HeadPlan& heads, int64_t head_dim, int64_t T);

  // xn: [T, hidden] (the normalised input, the same on every rank), the tokens of `chunks` back to
  // back, at `positions` [T] -> out: [T, hidden], summed over the group. Writes the chunks' keys
  // and values into layer `layer` of kv and reads the earlier positions from it.
  // scratch: scratch_floats(T) floats, clobbered.
  void forward(const float* xn, const std::vector<SeqChunk>& chunks, const int32_t* positions,
               KvStore& kv, int64_t layer, float* scratch, float* out) const;

  // Training: full causal attention over B sequences of S tokens each (xn [B*S, hidden], sequence
  // by sequence; positions 0..S-1 in each; no KV cache) -> out [B*S, hidden], summed over the
  // group. Keeps what backward() needs in `cache`. Under mode.sequence_parallel, xn and out are
  // this rank's rows, [shard_of(B*S, group).size(), hidden]: xn is all-gathered before the Q/K/V
  // GEMM and the output reduce-scattered instead of all-reduced. Under mode.recompute_probs the
  // softmax is not kept (cache.probs left empty).
  void forward_train(const float* xn, int64_t B, int64_t S, AttentionCache& cache, float* out,
                     const TrainMode& mode = {}) const;
  // dout [B*S, hidden] (the same on every rank) -> dxn [B*S, hidden] summed over the group (null:
  // skipped); dqkv [qkv rows, hidden] and d_o [hidden, qd] += the weight gradients (the K/V rows
  // that TP replicates summed over their replicas). xn and cache as forward_train left them, with
  // the same mode. Under mode.sequence_parallel, dout and dxn are this rank's rows (dout is
  // all-gathered, dxn reduce-scattered). Under mode.defer_weight_grads only dxn is computed (dqkv
  // and d_o are not touched and may be null) and the cache keeps what backward_weight() needs.
  void backward(const float* xn, AttentionCache& cache, const float* dout, int64_t B, int64_t S,
                float* dxn, float* dqkv, float* d_o, const TrainMode& mode = {}) const;
  // After backward() with mode.defer_weight_grads: dqkv and d_o += the weight gradients, bit for
  // bit what backward() without it adds. xn as given to forward_train (this rank's rows under SP:
  // gathered again here). Collective over the group under SP or when K/V rows are replicated.
  void backward_weight(const float* xn, AttentionCache& cache, int64_t B, int64_t S, float* dqkv,
                       float* d_o, const TrainMode& mode = {}) const;

  const HeadPlan& heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }
  const RopeSpec& rope() const { return rope_; }
  const ColumnParallelLinear& qkv() const { return qkv_; }
  const RowParallelLinear& o() const { return o_; }
  const std::vector<float>& qkv_bias() const { return qkv_bias_; }
  const comm::Group& group() const { return group_; }

 private:
  HeadPlan heads_;
  int64_t head_dim_ = 0;
  RopeSpec rope_;
  ColumnParallelLinear qkv_;
  RowParallelLinear o_;
  comm::Group group_;
  std::vector<float> qkv_bias_;  // empty, or [qkv rows]
};

}  // namespace parallm::parallel
