// The tiny LLaMA configs the training tests share (model, trainer, optimizer, reference tests).
//
// tiny_train_config: hidden 48, 24 query heads of head_dim 4 over 12 KV heads (GQA groups of 2;
// q_dim 96 != hidden on purpose), FFN 100 and vocabulary 67 (uneven at TP 3 and 4), 2 layers. Its
// heads fit TP 1, 2, 3, 4, 6 and 12 without replicating K/V.
// tiny_train_config_kv_replicated: 8 query heads over 2 KV heads, so TP 4 holds each KV head on 2
// ranks (HeadPlan's replication; TP 8 on 4).
#pragma once

#include "parallm/model/config.h"

namespace parallm::testing {

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
