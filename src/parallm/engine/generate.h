// One sequence on one tensor-parallel group: the generation loop (batch_generate.h) with a batch
// of one and no pipeline. Prefill the prompt (in chunks of prefill_chunk tokens if given), then
// decode a token at a time until EOS or max_tokens. Every rank of the group runs it with the same
// prompt; all ranks produce the same tokens (the sampler agrees across the vocab split).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/engine/sampler.h"
#include "parallm/model/llama.h"

namespace parallm {

struct GenerateOptions {
  int64_t max_tokens = 64;
  bool ignore_eos = false;
  SamplingParams sampling;
  int64_t prefill_chunk = 0;  // feed the prompt at most this many tokens per step; 0: at once
  bool collect_logits =
      false;  // gather the full vocabulary's logits of every step (tests, --print-logits)
  bool check_finite = false;  // scan after every layer (BatchOptions::check_finite)
};

struct GenerateResult {
  std::vector<int32_t> tokens;             // generated, not including the prompt
  std::vector<std::vector<float>> logits;  // per generated token, full vocab (collect_logits)
  double prefill_seconds = 0;
  double decode_seconds = 0;  // for tokens after the first
  bool stopped_at_eos = false;
  int64_t steps = 0;            // forward passes this sequence took (prompt chunks + decode steps)
  uint64_t kv_cache_bytes = 0;  // this rank's KV cache
  uint64_t workspace_bytes = 0;  // this rank's activation workspace
};

// Runs on every rank of `tp` (the model's group), which must hold the whole model. on_token is
// called on every rank for each new token, right after it is sampled.
GenerateResult generate(const LlamaModel& model, comm::Group tp, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = nullptr);
// The same where more ranks than tp run the model together: `stage` holds them all (TP x EP under
// expert parallelism, Mesh::tp_ep()); rank 0 of `stage` plans each step and broadcasts it.
GenerateResult generate(const LlamaModel& model, comm::Group tp, comm::Group stage,
                        const std::vector<int32_t>& prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = nullptr);


}  // namespace parallm
