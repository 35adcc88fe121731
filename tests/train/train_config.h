// The tiny LLaMA configs the training tests share (model, trainer, optimizer, reference tests).
//
// tiny_train_config: hidden 48, 24 query heads of head_dim 4 over 12 KV heads (GQA groups of 2;
// q_dim 96 != hidden on purpose), FFN 100 and vocabulary 67 (uneven at TP 3 and 4), 2 layers. Its
// heads fit TP 1, 2, 3, 4, 6 and 12 without replicating K/V.
// tiny_train_config_kv_replicated: 8 query heads over 2 KV heads, so TP 4 holds each KV head on 2
// ranks (HeadPlan's replication; TP 8 on 4).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "parallm/model/config.h"

namespace parallm::testing {

// B sequences of S random ids (inputs and targets drawn independently), seeded.
struct Batch {
  std::vector<int32_t> inputs, targets;
  int64_t B = 0, S = 0;
};

inline Batch make_batch(const ModelConfig& c, int64_t B, int64_t S, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(c.vocab_size - 1));
  Batch b{{}, {}, B, S};
  for (int64_t i = 0; i < B * S; ++i) {
    b.inputs.push_back(id(rng));
    b.targets.push_back(id(rng));
  }
  return b;
}

inline ModelConfig tiny_train_config(bool tied = false, bool interleaved = false) {
  ModelConfig c;
  c.hidden_size = 48;
  c.intermediate_size = 100;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 24;
  c.num_key_value_heads = 12;
  c.head_dim = 4;
  c.vocab_size = 67;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_interleaved = interleaved;
  c.tie_word_embeddings = tied;
  c.torch_dtype = "float32";
  c.validate("tiny_train_config");
  return c;
}

inline ModelConfig tiny_train_config_kv_replicated(bool tied = false, bool interleaved = false) {
  ModelConfig c = tiny_train_config(tied, interleaved);
  c.hidden_size = 32;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.validate("tiny_train_config_kv_replicated");
  return c;
}

}  // namespace parallm::testing
