// MoeLayer: Mixtral's sparse mixture-of-experts block, its experts split over an expert-parallel
// (EP) group and each expert's FFN split over a tensor-parallel (TP) group.
//
// Router (as Hugging Face's Mixtral): logits = xn . Wg^T [T, E]; softmax over all E in f32; the k
// largest (ties: the lower expert id first), in descending order; their weights renormalised to
// sum to 1; out = sum over those k experts of weight x expert(xn), expert(x) = w2(silu(w1 x) * w3
// x).
//
// Expert placement: EP rank r holds experts [begin, end) (expert_range), contiguous; E % EP need
// not be 0: the first E % EP ranks hold one expert more.
//
// Dispatch (forward_tokens, each EP rank with its own tokens):
//   1. route every token; one row per (token, chosen expert), packed by owning rank and, within a
//      destination, in (token, top-k) order; a row carries the token's hidden vector, the routing
//      weight and the expert id (H + 2 floats; the id's bits as they are);
//   2. the row counts per destination are exchanged (all-to-all of one i64 per rank), then the
//      rows (all-to-all-v);
//   3. each local expert multiplies the rows sent to it (gathered in source-rank order, then
//      arrival order) as one [rows, hidden] GEMM pair; under TP the partial sums of every row are
//      all-reduced over TP at once, then scaled by the row's routing weight;
//   4. the rows go back by the reverse all-to-all-v, and each token sums its k rows in the
//      router's top-k order.
// Every rank enters every collective, also one with no tokens and one whose experts receive none.
//
// Why the output is bit for bit the same at any EP: the router works row by row, an expert's GEMM
// sees exactly the same rows in the same order (all tokens routed to it, in global token order:
// ranks hold consecutive token ranges and rows arrive in source-rank order), and the final sum per
// token has a fixed order. Nothing is reduced across EP ranks.
//
// forward() is the engine's: every rank of the EP and TP groups holds the same tokens (attention is
// replicated over EP); EP rank r takes tokens [T*r/EP, T*(r+1)/EP), runs forward_tokens, and the
// outputs are all-gathered over EP (padded to the largest range).
//
// MoeMode::AllReduce is vLLM's --enable-expert-parallel layout: the EP group is made of ranks that
// already hold the same tokens (a TP group after attention's all-reduce), so there is no dispatch.
// Every rank routes all T tokens (the same result on every rank); for each (token, choice) whose
// expert is local it writes weight x expert(x) into Y [T, k, H] (zeros elsewhere); one all-reduce
// (sum) of Y over the EP group; then each token sums its k slots in top-k order. Each element of Y
// has exactly one non-zero contributor, and x + 0 = x exactly in any order, so the output is bit
// for bit Dispatch mode's at EP 1 (an expert's GEMM sees the same rows, (token, choice) order,
// either way). Experts are whole here: the `tp` group must be size 1 and `ffn` the full width.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/parallel/linear.h"
#include "parallm/parallel/shard.h"

namespace parallm::parallel {

// expert_range, expert_owner and moe_ep_problem (the placement) are in parallel/shard.h.

// The router alone, row by row (independent of how many rows a call holds): xn [T, H], router
// [E, H] f32 -> experts [T, k] (descending weight) and weights [T, k] (renormalised to sum to 1
// when `renormalize`).
// probs (when not null): [T, E], every token's softmax over all E (what training's backward and
// the load-balancing loss need).
void moe_route(const float* xn, int64_t T, const float* router, int64_t E, int64_t H, int k,
               bool renormalize, int32_t* experts, float* weights, float* probs = nullptr);

// Per-call counts, for statistics and tests.
// How the experts' group relates to the tokens (see above).
enum class MoeMode {
  Dispatch,   // EP ranks are replicas holding tokens; rows travel by all-to-all (Megatron-style)
  AllReduce,  // EP ranks hold the same tokens and whole experts; one all-reduce of [T, k, H] (vLLM)
};

struct MoeCallStats {
  std::vector<int64_t> rows_to_rank;     // rows this rank sent to each EP rank
  std::vector<int64_t> rows_per_expert;  // rows each local expert multiplied
};

class MoeLayer {
 public:
  MoeLayer() = default;
  // router: [E, hidden] f32 (every rank). w13[i]: expert (experts.begin + i)'s w1 rows of `ffn`
  // then its w3 rows, [2 ffn.size(), hidden]; w2[i]: its w2 columns of `ffn`, [hidden, ffn.size()].
  // `experts` must be expert_range(E, ep.size(), ep.rank()). `renormalize`: the top-k weights
  // renormalised to sum to 1 (Mixtral; qwen2_moe's norm_topk_prob), else the softmax's as they are.
  MoeLayer(Tensor router, std::vector<Tensor> w13, std::vector<Tensor> w2, int top_k,
           ShardSpec experts, ShardSpec ffn, comm::Group ep, comm::Group tp,
           bool renormalize = true, MoeMode mode = MoeMode::Dispatch);

  // xn [T, hidden], the same on every rank of both groups -> out [T, hidden], the same too.
  // MoeMode::AllReduce: every rank routes all T tokens, one all-reduce over `ep`.
  void forward(const float* xn, int64_t T, float* out) const;
  // xn [T, hidden]: this EP rank's own tokens (T may differ per rank, and be 0) -> out [T, hidden].
  // Collective over EP (and TP, whose ranks must hold the same tokens).
  void forward_tokens(const float* xn, int64_t T, float* out, MoeCallStats* stats = nullptr) const;

  int64_t num_experts() const { return router_.dim(0); }
  int64_t hidden() const { return router_.dim(1); }
  int top_k() const { return top_k_; }
  bool renormalize() const { return renormalize_; }
  const ShardSpec& experts() const { return experts_; }
  const ShardSpec& ffn() const { return ffn_; }
  const comm::Group& ep() const { return ep_; }
  MoeMode mode() const { return mode_; }
  uint64_t weight_bytes() const;  // router + this rank's expert slices

  // Counts since construction (or reset_counters), for --moe-stats: rows (token, expert pairs)
  // each local expert multiplied, and rows this rank sent to each EP rank (AllReduce mode: rows
  // routed to each EP rank's experts; every rank counts all the step's tokens, nothing is sent).
  const std::vector<int64_t>& expert_rows() const { return expert_rows_; }
  const std::vector<int64_t>& rows_sent() const { return rows_sent_; }
  void reset_counters() const;

 private:
  // Local expert i on n rows: x [n, hidden] -> y [n, hidden] (this TP rank's partial sum when the
  // FFN is split; not reduced, not scaled). gu: scratch, resized to [n, 2 ffn].
  void expert_ffn(size_t i, const float* x, int64_t n, std::vector<float>& gu, float* y) const;
  void forward_all_reduce(const float* xn, int64_t T, float* out) const;

  Tensor router_;  // [E, hidden] f32
  std::vector<ColumnParallelLinear> w13_;
  std::vector<RowParallelLinear> w2_;
  int top_k_ = 0;
  bool renormalize_ = true;
  MoeMode mode_ = MoeMode::Dispatch;
  ShardSpec experts_, ffn_;
  comm::Group ep_, tp_;
  // Mutable: forward() is const, and the counters are this rank's thread's alone.
  mutable std::vector<int64_t> expert_rows_, rows_sent_;
};

// ---- Training (docs/moe.md, "Training") ----
//
// The weights of one MoE layer as views of a parameter store (train/params.h keeps w1, w3, w2
// apart, as the checkpoint does): router [E, H]; per local expert (experts.begin + i) this TP
// rank's w1 and w3 rows [fl, H] and w2 columns [H, fl]. The gradients in the same shapes.
struct MoeTrainWeights {
  const float* router = nullptr;
  std::vector<const float*> w1, w3, w2;
};
struct MoeTrainGrads {
  float* router = nullptr;
  std::vector<float*> w1, w3, w2;
};

// What MoeTrainLayer::forward keeps for its backward (caller-owned, reused). T tokens of this EP
// rank, R rows it received (one per (token, choice) routed to its experts), fl = ffn.size().
struct MoeCache {
  std::vector<float> probs;                   // [T, E] the router's softmax
  std::vector<int32_t> experts;               // [T, k] chosen experts, descending weight
  std::vector<float> weights;                 // [T, k] their routing weights
  std::vector<int64_t> send_rows, recv_rows;  // per EP rank
  std::vector<int64_t> slot;                  // [T, k]: the row's place in the send buffer
  std::vector<float> recv;                    // [R, H + 2]: x | weight | expert id, as received
  std::vector<int64_t> order;                 // [R]: received rows grouped by local expert
  std::vector<int64_t> per_expert;            // rows of each local expert (in `order`)
  std::vector<float> gu;                      // [R, 2 fl] gate | up, in `order`
  std::vector<float> h;                       // [R, fl] silu(gate) * up, in `order`
  std::vector<float> y;                       // [R, H] expert outputs (TP-summed), arrival order
  int64_t floats() const {
    return static_cast<int64_t>(probs.size() + weights.size() + recv.size() + gu.size() + h.size() +
                                y.size());
  }
};

// Mixtral's MoE block with a backward, for training. Each EP rank holds its own tokens (EP ranks
// are data-parallel ranks) and experts `experts` (expert_range); the TP ranks of an EP rank hold
// the same tokens and split every expert's FFN (`ffn`). forward is forward_tokens' dispatch;
// backward runs the same exchanges in reverse:
//   1. the output gradient of each (token, choice) goes to the expert's rank (all-to-all-v of the
//      forward's counts);
//   2. there: dweight = dout . y (y the expert's unweighted output), dy = weight * dout, the
//      expert's SwiGLU backward (weight gradients added; the input gradient's TP partial sums
//      all-reduced over TP at once, as a column-parallel layer's);
//   3. each row's input gradient and dweight return by the reverse all-to-all-v;
//   4. the router's backward on the token's rank: through the renormalisation
//      (w_j = p_j / s, s = sum of the k chosen p: dp_j = (dw_j - sum_i w_i dw_i) / s), plus the
//      load-balancing loss's dp_e = aux_dprob[e] for every expert, then the softmax
//      (dl_e = p_e (dp_e - sum_i p_i dp_i)); dWg += dl^T xn, dxn += dl . Wg.
// Every rank enters every collective, also with no tokens or rows.
class MoeTrainLayer {
 public:
  MoeTrainLayer() = default;
  MoeTrainLayer(int64_t num_experts, int64_t hidden, int top_k, bool renormalize, ShardSpec experts,
                ShardSpec ffn, comm::Group ep, comm::Group tp);

  // xn [T, hidden] -> out [T, hidden] (overwritten), the same on every TP rank.
  void forward(const MoeTrainWeights& w, const float* xn, int64_t T, MoeCache& cache,
               float* out) const;
  // dout [T, hidden] -> dxn [T, hidden] (overwritten); the weight gradients added into g.
  // aux_dprob [E] (or null): the gradient of the loss with respect to every token's router
  // probability of expert e (the load-balancing loss's, the same for every token).
  void backward(const MoeTrainWeights& w, const float* xn, const MoeCache& cache, const float* dout,
                int64_t T, const float* aux_dprob, float* dxn, const MoeTrainGrads& g) const;

  int64_t num_experts() const { return E_; }
  int top_k() const { return k_; }
  const ShardSpec& experts() const { return experts_; }

 private:
  int64_t E_ = 0, H_ = 0;
  int k_ = 0;
  bool renormalize_ = true;
  ShardSpec experts_, ffn_;
  comm::Group ep_, tp_;
};

}  // namespace parallm::parallel
