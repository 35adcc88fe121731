// How a layer's training forward and backward run (parallel/attention.h, mlp.h, embedding.h,
// lm_head.h): sequence parallelism, selective recomputation and the zero-bubble split of the
// backward. One struct, passed to every training call of a layer, so the model sets a mode once.
#pragma once

#include <string_view>

namespace parallm::parallel {

// Activation recomputation (Korthikanti et al. 2022), one name for the trainer (train/model.h)
// and the planner's memory and time model (plan/workload.h):
//   None: every activation the backward needs is kept from the forward;
//   Selective: the attention's softmax probabilities are recomputed (TrainMode::recompute_probs);
//   Full: only each layer's input is kept, the layer's forward runs again before its backward.
enum class Recompute { None, Selective, Full };
const char* recompute_name(Recompute r);  // "none", "selective", "full"
// Throws std::invalid_argument naming `flag` and the value.
Recompute parse_recompute(std::string_view s, std::string_view flag = "--recompute");

struct TrainMode {
  // Sequence parallelism (Korthikanti et al. 2022): the layer's input and output (xn, out, and
  // their gradients dxn, dout) are this TP rank's rows of the B*S tokens (shard_of(B*S, tp):
  // [T_local, hidden]) instead of all T rows. The column-parallel input is all-gathered along the
  // rows (gather_from_sequence; its backward a reduce-scatter), and the row-parallel output is
  // reduce-scattered (reduce_scatter_to_sequence; its backward an all-gather) instead of
  // all-reduced. The gathered input is not kept: the backward (with defer_weight_grads, the
  // backward_weight) gathers it again for the weight gradient. q, k, v, attn, probs and the MLP's
  // gu, h still cover all T rows (they are split by heads / FFN rows, not by tokens).
  bool sequence_parallel = false;
  // Selective recomputation (--recompute selective): the attention's softmax probabilities
  // [B, heads, S, S] are not kept by the forward; the backward recomputes them from q and k.
  bool recompute_probs = false;
  // Zero-bubble split (ZB-H1): backward() computes the input gradient only (B) and keeps in the
  // cache what backward_weight() needs to add the weight gradients later (W): the output
  // gradient and the gradient of the column-parallel output (wgrad_* fields), besides attn / h and
  // the layer input xn that the caller keeps. Off: backward() does both, as before. Either way the
  // gradients are bit for bit the same; the K/V replicas' weight-gradient sum over TP runs in W.
  bool defer_weight_grads = false;
};

}  // namespace parallm::parallel
