#include "parallm/engine/stage_forward.h"

#include <cmath>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"

namespace parallm {

void check_finite_activations(const float* x, int64_t T, int64_t hidden, const std::string& where,
                              int64_t step) {
  for (int64_t i = 0; i < T * hidden; ++i)
    if (!std::isfinite(x[i]))
      fail<std::runtime_error>("generate", "step ", step, ": a non-finite value (", x[i],
                               ") first appeared in the output of ", where, " (token row ",
                               i / hidden, " of ", T, ")");
}

StageForward::StageForward(const LlamaModel& model, int slots, int64_t capacity, int64_t max_tokens)
    : model_(model), max_tokens_(max_tokens) {
  if (max_tokens < 1) fail("engine", "a forward of at most ", max_tokens, " tokens");
  auto kv = std::make_unique<KvCache>(model.local_layers(), slots, capacity, model.local_kv_dim());
  kv_bytes_ = kv->bytes();
  kv_ = std::move(kv);
  ws_ = model.make_workspace(max_tokens);
}

StageForward::StageForward(const LlamaModel& model, const Paged& p, int64_t max_tokens)
    : model_(model), max_tokens_(max_tokens) {
  if (max_tokens < 1) fail("engine", "a forward of at most ", max_tokens, " tokens");
  auto kv = std::make_unique<PagedKvCache>(model.local_layers(), model.local_kv_dim(),
                                           p.num_blocks, p.block_size, p.slots,
                                           p.max_blocks_per_slot);
  kv_bytes_ = kv->bytes();
  paged_ = kv.get();
  kv_ = std::move(kv);
  ws_ = model.make_workspace(max_tokens);
}

void StageForward::embed(const int32_t* ids, int64_t T, float* x) const {
  TraceSpan span("embed", "compute");
  model_.embed(ids, T, x);
}

void StageForward::layers(float* x, const std::vector<SeqChunk>& chunks, bool check_finite,
                          int64_t step) {
  if (!check_finite) {
    model_.forward_layers(x, chunks, *kv_, ws_);
    return;
  }
  const int64_t H = model_.config().hidden_size;
  model_.forward_layers(x, chunks, *kv_, ws_, [&](int64_t layer, const float* out, int64_t T) {
    check_finite_activations(out, T, H, cat("layer ", layer), step);
  });
}

void StageForward::head(float* rows, int64_t R, float* logits) const {
  model_.head(rows, R, logits);
}

}  // namespace parallm
