#include "parallm/engine/generate.h"

#include <algorithm>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/engine/batch_generate.h"

namespace parallm {

GenerateResult generate(const LlamaModel& model, comm::Group tp, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  comm::Group stage = tp;
  return generate(model, std::move(tp), std::move(stage), prompt, options, on_token);
}

GenerateResult generate(const LlamaModel& model, comm::Group tp, comm::Group stage,
                        const std::vector<int32_t>& prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  if (!model.has_embedding() || !model.has_head())
    fail("generate", "this model holds layers [", model.layer_begin(), ", ", model.layer_end(),
         "), not the whole model; pipeline stages run through generate_batch");
  if (prompt.empty()) fail("generate", "the prompt is empty (give --prompt or --prompt-ids)");
  BatchOptions bo;
  bo.max_tokens = options.max_tokens;
  bo.ignore_eos = options.ignore_eos;
  bo.sampling = options.sampling;
  bo.micro_batches = 1;
  bo.prefill_chunk = options.prefill_chunk;
  bo.collect_logits = options.collect_logits;
  bo.check_finite = options.check_finite;
  TokenCallback cb;
  if (on_token) cb = [&](int, int32_t token) { on_token(token); };
  BatchResult r =
      run_generation(model, tp, comm::Group(), stage, {Request{prompt, options.max_tokens}}, bo, cb);
  GenerateResult out;
  SequenceOutput& seq = r.sequences[0];
  out.tokens = std::move(seq.tokens);
  out.logits = std::move(seq.logits);
  out.stopped_at_eos = seq.stopped_at_eos;
  out.steps = seq.steps;
  out.kv_cache_bytes = r.kv_cache_bytes;
  out.workspace_bytes = r.workspace_bytes;
  out.prefill_seconds = r.prefill_seconds;
  out.decode_seconds = r.seconds - r.prefill_seconds;
  return out;
}

}  // namespace parallm
