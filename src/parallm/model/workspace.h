// Workspace: the scratch memory of one rank's forward pass through its layers, owned by the caller
// (the engine allocates one per generation) instead of buffers hidden in the model. Sized for at
// most max_tokens tokens per LlamaModel::forward_layers call; its bytes are known before it is
// allocated (WorkspaceLayout::bytes), so the planner and --mem-stats can count them.
#pragma once

#include <cstdint>

#include "parallm/core/tensor.h"

namespace parallm {

// Floats per token of each region. The attention and MLP blocks run one after the other, so they
// share one scratch region sized for the larger of the two.
struct WorkspaceLayout {
  int64_t hidden = 0;             // normed input and block output: [T, hidden] each
  int64_t scratch_per_token = 0;  // the attention's or the MLP's scratch, whichever is larger

  // Bytes of a workspace for max_tokens tokens (what Workspace(layout, max_tokens) allocates).
  uint64_t bytes(int64_t max_tokens) const;
  bool operator==(const WorkspaceLayout&) const = default;
};

class Workspace {
 public:
  Workspace() = default;
  // Allocates (uninitialised) room for max_tokens >= 1 tokens.
  Workspace(const WorkspaceLayout& layout, int64_t max_tokens);
  // Move-only: a copy would share the memory (Tensor storage is shared), and two forward passes
  // on one workspace at once would overwrite each other's activations.
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  Workspace(Workspace&&) = default;
  Workspace& operator=(Workspace&&) = default;

  const WorkspaceLayout& layout() const { return layout_; }
  int64_t max_tokens() const { return max_tokens_; }
  uint64_t bytes() const { return storage_.nbytes(); }

  float* normed() const { return base(); }                                    // [T, hidden]
  float* block_out() const { return base() + max_tokens_ * layout_.hidden; }  // [T, hidden]
  float* scratch() const { return base() + 2 * max_tokens_ * layout_.hidden; }
  int32_t* positions() const {  // [T]
    return reinterpret_cast<int32_t*>(scratch() + max_tokens_ * layout_.scratch_per_token);
  }

 private:
  float* base() const { return storage_.data<float>(); }

  WorkspaceLayout layout_;
  int64_t max_tokens_ = 0;
  Tensor storage_;
};

}  // namespace parallm
