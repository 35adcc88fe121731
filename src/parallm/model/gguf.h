// GGUF, llama.cpp's model file (versions 2 and 3, little-endian):
//   "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//   kv_count x (string key | u32 value type | value)       metadata
//   tensor_count x (string name | u32 n_dims | n_dims x u64 ne | u32 ggml type | u64 offset)
//   padding to general.alignment (default 32) | data section (offsets relative to its start)
// where a string is u64 length + bytes, and an array value is u32 element type + u64 count +
// elements. ne[0] is the fastest-varying dimension (a row's length), so parallm's shape is ne
// reversed.
//
// parse_gguf validates every field (magic, version, counts against the bytes left, string
// lengths, value types, array nesting depth, n_dims, dimensions, tensor types, a row length that
// is not a multiple of the type's block, offsets aligned and inside the file, overlapping or
// duplicate tensors, the alignment) and throws std::invalid_argument with one line naming the
// source, the field and the value. open_gguf / GgufFile map the file; write_gguf writes one.
//
// Model loading (gguf_llama_config, open_gguf_llama): llama.cpp's LLaMA tensor names
// (token_embd, blk.N.attn_q, ...) are exposed under Hugging Face names; q/k rows stay in
// llama.cpp's order (RoPE on adjacent pairs), so the config says rope_interleaved.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallm/core/tensor.h"
#include "parallm/model/config.h"
#include "parallm/model/mmap_file.h"
#include "parallm/model/mmap_file_source.h"
#include "parallm/model/weights.h"

namespace parallm {

enum class GgufType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12
};
std::string gguf_type_name(GgufType t);

// One metadata value. Scalars keep their type; integers in `i` (u64 beyond 2^63 wraps, as its
// bits), floats in `f`, bool in `i`, strings in `s`; arrays in `items` with `elem` their type.
struct GgufValue {
  GgufType type = GgufType::U32;
  int64_t i = 0;
  double f = 0;
  std::string s;
  GgufType elem = GgufType::U8;
  std::vector<GgufValue> items;

  static GgufValue u32(uint32_t v) { return of(GgufType::U32, v); }
  static GgufValue i32(int32_t v) { return of(GgufType::I32, v); }
  static GgufValue u64(uint64_t v) { return of(GgufType::U64, static_cast<int64_t>(v)); }
  static GgufValue f32(float v) {
    GgufValue g;
    g.type = GgufType::F32;
    g.f = v;
    return g;
  }
  static GgufValue boolean(bool v) { return of(GgufType::Bool, v ? 1 : 0); }
  static GgufValue str(std::string v) {
    GgufValue g;
    g.type = GgufType::String;
    g.s = std::move(v);
    return g;
  }
  static GgufValue of(GgufType t, int64_t v) {  // an integer (or bool) of type t
    GgufValue g;
    g.type = t;
    g.i = v;
    return g;
  }
  static GgufValue array(GgufType elem, std::vector<GgufValue> items);
  bool is_int() const;    // any integer type (not bool)
  bool is_float() const;  // F32, F64
};

// ggml's type ids for the dtypes parallm reads: F32 0, F16 1, Q4_0 2, Q8_0 8, Q4_K 12, Q5_K 13,
// Q6_K 14, BF16 30. Others: std::invalid_argument naming the id.
uint32_t gguf_ggml_type(DType t);
DType dtype_of_ggml_type(uint32_t type, const std::string& what);

struct GgufTensorInfo {
  std::string name;
  Shape shape;  // parallm order (ne reversed)
  DType dtype = DType::F32;
  uint64_t offset = 0;  // absolute, in the file
  uint64_t nbytes = 0;
};

struct GgufHeader {
  uint32_t version = 3;
  uint64_t alignment = 32;
  uint64_t data_start = 0;                                  // absolute offset of the data section
  std::vector<std::pair<std::string, GgufValue>> metadata;  // in file order
  std::vector<GgufTensorInfo> tensors;                      // in file order
  const GgufValue* find(const std::string& key) const;      // null when absent
};

// Limits far above any real file, so a small header cannot ask for huge allocations.
inline constexpr uint64_t kGgufMaxArrayDepth = 4;
inline constexpr uint64_t kGgufMaxDims = 4;

GgufHeader parse_gguf(const uint8_t* bytes, size_t size, const std::string& source);

// Writes a GGUF v3 file (alignment 32, general.alignment only if given in metadata): tensors in
// the given order, each at the next aligned offset. Tensors: contiguous, dtype F32, F16, BF16,
// Q8_0, Q4_0, Q4_K, Q5_K or Q6_K, 1-4 dims. Writes to a temporary file and renames it.
void write_gguf(const std::string& path,
                const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<std::pair<std::string, Tensor>>& tensors);

// A mapped GGUF file with its parsed header.
struct GgufFile {
  std::shared_ptr<const MappedFile> file;
  GgufHeader header;
};
GgufFile open_gguf(const std::string& path);

// A LLaMA-architecture GGUF (general.architecture "llama"): the model config from its metadata
// (llama.* keys; vocab from the token list or the embedding), rope_interleaved = true.
ModelConfig gguf_llama_config(const GgufHeader& h, const std::string& source);
// The GGUF name of a Hugging Face LLaMA tensor name ("model.layers.3.self_attn.q_proj.weight" ->
// "blk.3.attn_q.weight"), "" when there is none.
std::string gguf_name_of(const std::string& hf_name);
// A Mixtral expert matrix's GGUF name: "model.layers.3.block_sparse_moe.experts.5.w1.weight" ->
// "blk.3.ffn_gate_exps.weight" with *expert = 5 (w2: ffn_down_exps, w3: ffn_up_exps; the router
// block_sparse_moe.gate is gguf_name_of's ffn_gate_inp); "" when `hf_name` is no expert matrix.
std::string gguf_expert_name_of(const std::string& hf_name, int64_t* expert);
// Opens a LLaMA GGUF as a WeightSource with Hugging Face names; fills `config`.
std::unique_ptr<WeightSource> open_gguf_llama(const std::string& path, ModelConfig* config);

// The tokenizer inside a GGUF: tokenizer.ggml.model "llama" (a sentencepiece vocabulary:
// tokenizer.ggml.tokens, .scores, .token_type, .bos/.eos/.unknown_token_id) becomes a
// sentencepiece BPE model (byte fallback when the vocabulary has byte pieces, identity
// normalizer, a dummy space prefix: LLaMA's options) run by libsentencepiece; "gpt2" (byte-level
// BPE: .tokens, .merges, .token_type, the split named by .pre: default/gpt2, llama-bpe/llama3,
// qwen2; BOS only with .add_bos_token; EOS .eos_token_id and .eot_token_id) becomes the
// equivalent tokenizer.json run by tokenizer_hf. Null when the file has no tokenizer or another
// model. Throws std::invalid_argument naming the field when the vocabulary is malformed.
std::unique_ptr<class Tokenizer> gguf_tokenizer(const GgufHeader& h, const std::string& source);
// The same vocabulary as tokenizer.ggml.* metadata entries (for `parallm quantize`), from a
// sentencepiece .model file; empty when `spm_file` is not one.
std::vector<std::pair<std::string, GgufValue>> gguf_tokenizer_metadata(const std::string& spm_file);

}  // namespace parallm
