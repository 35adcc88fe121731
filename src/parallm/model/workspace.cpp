#include "parallm/model/workspace.h"

#include "parallm/core/error.h"

namespace parallm {

uint64_t WorkspaceLayout::bytes(int64_t max_tokens) const {
  // normed + block_out + scratch floats, then the positions (int32, 4 bytes like a float).
  const int64_t floats = max_tokens * (2 * hidden + scratch_per_token + 1);
  return static_cast<uint64_t>(floats) * sizeof(float);
}

Workspace::Workspace(const WorkspaceLayout& layout, int64_t max_tokens)
    : layout_(layout), max_tokens_(max_tokens) {
  if (max_tokens < 1)
    fail("workspace", "a workspace needs room for at least 1 token, asked for ", max_tokens);
  if (layout.hidden < 1 || layout.scratch_per_token < 0)
    fail("workspace", "bad layout: hidden ", layout.hidden, ", scratch per token ",
         layout.scratch_per_token);
  static_assert(sizeof(int32_t) == sizeof(float));
  storage_ =
      Tensor::empty(DType::F32, {static_cast<int64_t>(layout.bytes(max_tokens) / sizeof(float))});
}

}  // namespace parallm
