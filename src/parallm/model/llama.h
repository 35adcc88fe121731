// The LLaMA architecture (also Mistral-7B-style and TinyLlama configs) built from the parallel
// layers, for one rank: its tensor-parallel shard of its pipeline stage's layers.
//
// Per decoder layer:  x += RowParallel(o)(attention(rope(ColumnParallel(qkv)(rmsnorm(x)))))
//                     x += RowParallel(down)(silu(gate) * up), gate/up = ColumnParallel(rmsnorm(x))
// so a layer costs exactly two all-reduces forward when TP > 1 (none when TP == 1).
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/tensor.h"
#include "parallm/kernels/ops.h"
#include "parallm/model/config.h"
#include "parallm/model/weights.h"
#include "parallm/parallel/linear.h"
#include "parallm/parallel/shard.h"

namespace parallm {

// Where a rank's keys and values live: the engine's KV cache implements this. Position p of local
// KV head h of layer l (counted within this rank's layers) for sequence `slot` is at
// keys(l, slot) + p * kv_stride() + h * head_dim.
class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual float* keys(int64_t layer, int slot) = 0;
  virtual float* values(int64_t layer, int slot) = 0;
  virtual int64_t kv_stride() const = 0;
  virtual int64_t capacity() const = 0;  // positions per sequence
};

// A run of consecutive tokens of one sequence inside a batch.
struct SeqChunk {
  int slot = 0;           // which sequence (KV cache slot)
  int64_t start_pos = 0;  // position of the chunk's first token
  int64_t n_tokens = 0;
};

struct LlamaOptions {
  DType weight_dtype = DType::BF16;  // matrices and embeddings; norms are always f32
  int64_t layer_begin = 0;           // this rank's pipeline stage: layers [layer_begin, layer_end)
  int64_t layer_end = -1;            // -1: to the last layer
};

class LlamaModel {
 public:
  // Reads this rank's slices from `source` (and only those). `tp` is the tensor-parallel group.
  LlamaModel(const ModelConfig& config, const WeightSource& source, comm::Group tp,
             LlamaOptions options = {});

  const ModelConfig& config() const { return config_; }
  bool has_embedding() const { return opts_.layer_begin == 0; }
  bool has_head() const { return opts_.layer_end == config_.num_hidden_layers; }
  int64_t layer_begin() const { return opts_.layer_begin; }
  int64_t layer_end() const { return opts_.layer_end; }
  int64_t local_layers() const { return opts_.layer_end - opts_.layer_begin; }
  const parallel::HeadPlan& heads() const { return heads_; }
  const parallel::ShardSpec& vocab_shard() const { return vocab_; }
  int64_t local_kv_dim() const { return heads_.kv_heads * config_.head_dim; }

  // ids: [T] -> x: [T, hidden]. First stage only.
  void embed(const int32_t* ids, int64_t T, float* x) const;
  // x: [T, hidden], the tokens of `chunks` back to back, through this rank's layers, in place.
  // Writes their keys and values into `kv` and reads the earlier positions from it.
  void forward_layers(float* x, const std::vector<SeqChunk>& chunks, KvStore& kv) const;
  // x: [R, hidden] -> logits: [R, vocab_shard().size()] (final norm, then this rank's vocab
  // slice of the LM head). Last stage only. x is normalised in place.
  void head(float* x, int64_t R, float* logits) const;

  // Bytes of weights this rank holds, and the bytes a decode step reads (every matrix once; the
  // embedding contributes one row).
  uint64_t weight_bytes() const { return weight_bytes_; }
  uint64_t decode_bytes_per_token() const;

 private:
  struct Layer {
    std::vector<float> attn_norm, ffn_norm;
    parallel::ColumnParallelLinear qkv;      // [q + k + v local rows, hidden]
    parallel::RowParallelLinear o;           // [hidden, q local]
    parallel::ColumnParallelLinear gate_up;  // [2 * ffn local, hidden]: gate rows then up rows
    parallel::RowParallelLinear down;        // [hidden, ffn local]
  };

  ModelConfig config_;
  LlamaOptions opts_;
  comm::Group tp_;
  parallel::HeadPlan heads_;
  parallel::ShardSpec ffn_, vocab_;
  std::vector<float> inv_freq_;
  kernels::RopeStyle rope_style_;
  std::vector<Layer> layers_;
  parallel::VocabParallelEmbedding embedding_;
  Tensor lm_head_;  // [vocab local, hidden]; shares the embedding's storage when tied
  std::vector<float> final_norm_;
  uint64_t weight_bytes_ = 0;
};

}  // namespace parallm
