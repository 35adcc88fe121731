// The tiny GQA LLaMA config the model tests share: hidden 8, 2 heads of 4, 1 KV head, FFN 12,
// 2 layers, vocab 10, bf16.
#pragma once

#include "parallm/model/config.h"

namespace parallm::testing {

inline ModelConfig tiny_gqa_config(bool tied) {
  ModelConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.vocab_size = 10;
  c.tie_word_embeddings = tied;
  c.torch_dtype = "bfloat16";
  c.validate("tiny");
  return c;
}

}  // namespace parallm::testing
