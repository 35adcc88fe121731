#include "parallm/engine/stage_forward.h"

#include <cmath>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"

namespace parallm {
namespace {

// The per-layer check without a hook in the model: forward_layers runs layer l as
//   x += attention(rmsnorm(x)) (which writes and reads layer l's keys and values), x += mlp(...),
// so when it first asks the KV store for layer l > first, x holds exactly layer l-1's output.
// This store forwards to the cache and scans x at each such change of layer; the last layer's
// output is scanned after forward_layers returns.
class FiniteCheckingKv : public KvStore {
 public:
  FiniteCheckingKv(KvStore& kv, const float* x, int64_t T, int64_t hidden, int64_t layer_begin,
                   int64_t step)
      : kv_(kv), x_(x), T_(T), hidden_(hidden), layer_begin_(layer_begin), step_(step) {}
  float* keys(int64_t layer, int slot) override {
    seen(layer);
    return kv_.keys(layer, slot);
  }
  float* values(int64_t layer, int slot) override {
    seen(layer);
    return kv_.values(layer, slot);
  }
  int64_t kv_stride() const override { return kv_.kv_stride(); }
  int64_t capacity() const override { return kv_.capacity(); }

 private:
  void seen(int64_t layer) {
    // layer is local (0 = this stage's first); x changes only between layers.
    for (; checked_ < layer; ++checked_)
      check_finite_activations(x_, T_, hidden_, cat("layer ", layer_begin_ + checked_), step_);
  }
  KvStore& kv_;
  const float* x_;
  int64_t T_, hidden_, layer_begin_, step_;
  int64_t checked_ = 0;  // local layers whose output has been scanned
};

}  // namespace

void check_finite_activations(const float* x, int64_t T, int64_t hidden, const std::string& where,
                              int64_t step) {
  for (int64_t i = 0; i < T * hidden; ++i)
    if (!std::isfinite(x[i]))
      fail<std::runtime_error>("generate", "step ", step, ": a non-finite value (", x[i],
                               ") first appeared in the output of ", where, " (token row ",
                               i / hidden, " of ", T, ")");
}

StageForward::StageForward(const LlamaModel& model, int slots, int64_t capacity, int64_t max_tokens)
    : model_(model),
      max_tokens_(max_tokens),
      kv_(model.local_layers(), slots, capacity, model.local_kv_dim()) {
  if (max_tokens < 1) fail("engine", "a forward of at most ", max_tokens, " tokens");
  ws_ = model.make_workspace(max_tokens);
}

void StageForward::embed(const int32_t* ids, int64_t T, float* x) const {
  TraceSpan span("embed", "compute");
  model_.embed(ids, T, x);
}

void StageForward::layers(float* x, const std::vector<SeqChunk>& chunks, bool check_finite,
                          int64_t step) {
  if (!check_finite) {
    model_.forward_layers(x, chunks, kv_, ws_);
    return;
  }
  int64_t T = 0;
  for (const SeqChunk& ch : chunks) T += ch.n_tokens;
  const int64_t H = model_.config().hidden_size;
  FiniteCheckingKv checked(kv_, x, T, H, model_.layer_begin(), step);
  model_.forward_layers(x, chunks, checked, ws_);
  if (T > 0 && model_.local_layers() > 0)
    check_finite_activations(x, T, H, cat("layer ", model_.layer_end() - 1), step);
}

void StageForward::head(float* rows, int64_t R, float* logits) const {
  model_.head(rows, R, logits);
}

}  // namespace parallm
