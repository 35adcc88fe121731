// llama2.c legacy checkpoints (models/stories260K/README.md): 7 int32 (dim, hidden_dim,
// n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then float32 arrays, each layer-major:
// token_embedding [vocab, dim], rms_att [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim],
// wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn [L, dim], w1 [L, hidden, dim],
// w2 [L, dim, hidden], w3 [L, hidden, dim], rms_final [dim], RoPE tables [seq_len, head_dim]
// (skipped), and, only when vocab_size < 0, the untied classifier [|vocab|, dim].
// open_llama2c() is declared in weights.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallm/model/config.h"
#include "parallm/model/mmap_file_source.h"

namespace parallm {

struct Llama2cHeader {
  int32_t dim = 0;
  int32_t hidden_dim = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t vocab_size = 0;  // negative: the classifier is stored, not shared with the embedding
  int32_t seq_len = 0;
};

inline constexpr size_t kLlama2cHeaderBytes = 7 * sizeof(int32_t);

// The ModelConfig a header describes (head_dim = dim / n_heads, interleaved RoPE, theta 10000,
// eps 1e-5, tied unless vocab_size < 0). Throws std::invalid_argument naming `source` and the
// field.
ModelConfig llama2c_config(const Llama2cHeader& header, const std::string& source);

// The file size the header implies, in bytes (header included).
uint64_t llama2c_file_bytes(const Llama2cHeader& header);

// The tensors of a llama2.c file of `size` bytes whose header is at `bytes` (only the header is
// read: `bytes` holds at least kLlama2cHeaderBytes when size does), with absolute offsets, file
// index 0; sets *config when given. open_llama2c() maps the file and calls this; the fuzzer
// (fuzz/llama2c_header.cpp) calls it on bytes in memory. Throws std::invalid_argument naming
// `source` and the field.
std::vector<MappedTensor> llama2c_tensors(const uint8_t* bytes, uint64_t size,
                                          const std::string& source, ModelConfig* config);

}  // namespace parallm
