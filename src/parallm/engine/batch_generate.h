// Batched generation through a pipeline of stages, each stage a tensor-parallel group.
//
// The batch of sequences is cut into micro-batches that flow through the stages by the GPipe
// forward-only schedule (pipeline/schedule.h), run by the pipeline executor: stage s works on
// micro-batch j while stage s+1 works on j-1. Decode keeps the pipeline full across steps: the last
// stage samples micro-batch j's next tokens and sends them straight back to the first stage, which
// starts j's next step while the later micro-batches of this step are still in flight, so with
// micro-batches >= stages no stage waits between steps.
//
// Every rank calls it with the same prompts and options. Each sequence has its own length,
// position, sampler and stop (EOS or max_tokens); sampling is seeded per sequence exactly as a run
// of that prompt alone, so a batched run gives each prompt the tokens it gets alone.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/mesh.h"
#include "parallm/engine/generate.h"
#include "parallm/model/llama.h"

namespace parallm {

struct BatchOptions {
  int64_t max_tokens = 64;
  bool ignore_eos = false;
  SamplingParams sampling;
  int micro_batches = 0;        // 0: as many as pipeline stages (capped at the batch size)
  bool collect_logits = false;  // full-vocab logits of every step (last stage's ranks)
};

struct SequenceOutput {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;  // collect_logits, on the last stage
  bool stopped_at_eos = false;
};

struct BatchResult {
  std::vector<SequenceOutput> sequences;  // complete on the first and the last stage
  int micro_batches = 0;
  double seconds = 0;               // the whole generation, on this rank
  double busy_seconds = 0;          // this rank's compute (embedding, layers, head, sampling)
  double prefill_seconds = 0;       // until the last stage finished the prompts (same on all ranks)
  double prefill_busy_seconds = 0;  // this rank's compute during the prompt pass
};

BatchResult generate_batch(const LlamaModel& model, const comm::Mesh& mesh,
                           const std::vector<std::vector<int32_t>>& prompts,
                           const BatchOptions& options);

}  // namespace parallm
