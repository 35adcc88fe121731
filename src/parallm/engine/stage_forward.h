// StageForward: the engine's calls into the model, in one place. It owns what a stage's forward
// needs beside the weights: the KV cache of every sequence slot and the activation workspace sized
// by max_tokens. The generation loop and `bench prefill` go
// through it, so a change of the model's forward API is adapted here alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallm/engine/kv_cache.h"
#include "parallm/model/llama.h"

namespace parallm {

// Fails (std::runtime_error) when x: [T, hidden] holds a non-finite value, naming `where` (e.g.
// "layer 3"), the step, and the token row and value.
void check_finite_activations(const float* x, int64_t T, int64_t hidden, const std::string& where,
                              int64_t step);

class StageForward {
 public:
  // slots sequences of up to `capacity` positions; at most max_tokens tokens per forward.
  StageForward(const LlamaModel& model, int slots, int64_t capacity, int64_t max_tokens);

  const LlamaModel& model() const { return model_; }
  int64_t max_tokens() const { return max_tokens_; }

  // ids: [T] -> x: [T, hidden]. First stage only.
  void embed(const int32_t* ids, int64_t T, float* x) const;
  // x: [T, hidden], the tokens of `chunks` back to back, through this stage's layers, in place.
  // check_finite: x is scanned after every layer, and a non-finite value fails naming the layer
  // (global index) and `step`.
  void layers(float* x, const std::vector<SeqChunk>& chunks, bool check_finite = false,
              int64_t step = 0);
  // rows: [R, hidden] (normalised in place) -> logits: [R, vocab shard]. Last stage only.
  void head(float* rows, int64_t R, float* logits) const;

  uint64_t kv_bytes() const { return kv_.bytes(); }
  uint64_t workspace_bytes() const { return ws_.bytes(); }

 private:
  const LlamaModel& model_;
  int64_t max_tokens_;
  KvCache kv_;
  Workspace ws_;
};

}  // namespace parallm
