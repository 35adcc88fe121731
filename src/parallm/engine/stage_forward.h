// StageForward: the engine's calls into the model, in one place. It owns what a stage's forward
// needs beside the weights: the KV cache of every sequence slot and the activation workspace sized
// by max_tokens. The generation loop and `bench prefill` go
// through it, so a change of the model's forward API is adapted here alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <memory>

#include "parallm/engine/kv_cache.h"
#include "parallm/engine/paged_kv_cache.h"
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
  // Serving: a paged cache of num_blocks blocks of block_size positions (paged_kv_cache.h), slots
  // sequences of at most max_blocks_per_slot blocks.
  struct Paged {
    int64_t num_blocks = 0, block_size = 16;
    int slots = 1;
    int64_t max_blocks_per_slot = 1;
  };
  StageForward(const LlamaModel& model, const Paged& paged, int64_t max_tokens);

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

  uint64_t kv_bytes() const { return kv_bytes_; }
  uint64_t workspace_bytes() const { return ws_.bytes(); }
  // The paged cache (its block tables), null for the contiguous one.
  PagedKvCache* paged() { return paged_; }

 private:
  const LlamaModel& model_;
  int64_t max_tokens_;
  std::unique_ptr<KvStore> kv_;
  PagedKvCache* paged_ = nullptr;
  uint64_t kv_bytes_ = 0;
  Workspace ws_;
};

}  // namespace parallm
