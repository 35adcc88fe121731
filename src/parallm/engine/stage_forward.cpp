#include "parallm/engine/stage_forward.h"

#include "parallm/core/error.h"
#include "parallm/core/trace.h"

namespace parallm {

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

void StageForward::layers(float* x, const std::vector<SeqChunk>& chunks) {
  model_.forward_layers(x, chunks, kv_, ws_);
}

void StageForward::head(float* rows, int64_t R, float* logits) const {
  model_.head(rows, R, logits);
}

}  // namespace parallm
