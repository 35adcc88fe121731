#include "parallm/model/llama2c.h"

#include <cstring>
#include <limits>

#include "parallm/core/error.h"
#include "parallm/model/mmap_file_source.h"

namespace parallm {
namespace {

constexpr const char* kComponent = "llama2c";
// llama2.c's newer exports (version 1, 2) start with this magic ("ak42" little-endian).
constexpr uint32_t kLlama2cMagic = 0x616b3432u;

// Element counts of the arrays, in int128 so that absurd headers cannot overflow.
struct Counts {
  __int128 kv_dim, head_dim, vocab;
};

Counts counts(const Llama2cHeader& h) {
  Counts c;
  c.head_dim = h.dim / h.n_heads;
  c.kv_dim = static_cast<__int128>(h.dim) * h.n_kv_heads / h.n_heads;
  c.vocab = h.vocab_size < 0 ? -static_cast<__int128>(h.vocab_size) : h.vocab_size;
  return c;
}

}  // namespace

ModelConfig llama2c_config(const Llama2cHeader& h, const std::string& source) {
  auto positive = [&](const char* field, int32_t v) {
    if (v <= 0) fail(kComponent, source, ": header field ", field, " must be positive, got ", v);
  };
  positive("dim", h.dim);
  positive("hidden_dim", h.hidden_dim);
  positive("n_layers", h.n_layers);
  positive("n_heads", h.n_heads);
  positive("n_kv_heads", h.n_kv_heads);
  positive("seq_len", h.seq_len);
  if (h.vocab_size == 0 || h.vocab_size == std::numeric_limits<int32_t>::min())
    fail(kComponent, source, ": header field vocab_size must be non-zero, got ", h.vocab_size);
  if (h.dim % h.n_heads != 0)
    fail(kComponent, source, ": dim ", h.dim, " is not divisible by n_heads ", h.n_heads);
  if (h.n_heads % h.n_kv_heads != 0)
    fail(kComponent, source, ": n_heads ", h.n_heads, " is not divisible by n_kv_heads ",
         h.n_kv_heads);
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = h.dim;
  c.intermediate_size = h.hidden_dim;
  c.num_hidden_layers = h.n_layers;
  c.num_attention_heads = h.n_heads;
  c.num_key_value_heads = h.n_kv_heads;
  c.head_dim = h.dim / h.n_heads;
  c.vocab_size = h.vocab_size < 0 ? -static_cast<int64_t>(h.vocab_size) : h.vocab_size;
  c.max_position_embeddings = h.seq_len;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.rope_interleaved = true;  // Meta's pairing (x[2i], x[2i+1]); q/k are stored unpermuted
  c.tie_word_embeddings = h.vocab_size > 0;
  c.torch_dtype = "float32";
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.validate(source);
  return c;
}

uint64_t llama2c_file_bytes(const Llama2cHeader& h) {
  const Counts c = counts(h);
  const __int128 dim = h.dim, hidden = h.hidden_dim, layers = h.n_layers;
  __int128 floats = c.vocab * dim;                          // token_embedding
  floats += layers * dim;                                   // rms_att
  floats += layers * dim * dim * 2;                         // wq, wo
  floats += layers * c.kv_dim * dim * 2;                    // wk, wv
  floats += layers * dim;                                   // rms_ffn
  floats += layers * hidden * dim * 3;                      // w1, w2, w3
  floats += dim;                                            // rms_final
  floats += static_cast<__int128>(h.seq_len) * c.head_dim;  // RoPE cos/sin tables
  if (h.vocab_size < 0) floats += c.vocab * dim;            // wcls
  const __int128 bytes = floats * 4 + kLlama2cHeaderBytes;
  return bytes > std::numeric_limits<uint64_t>::max() ? std::numeric_limits<uint64_t>::max()
                                                      : static_cast<uint64_t>(bytes);
}

std::vector<MappedTensor> llama2c_tensors(const uint8_t* bytes, uint64_t size,
                                          const std::string& path, ModelConfig* config) {
  if (size < kLlama2cHeaderBytes)
    fail(kComponent, path, ": the file has ", size, " bytes, fewer than the ",
         kLlama2cHeaderBytes, "-byte header");
  Llama2cHeader h;
  int32_t raw[7];
  std::memcpy(raw, bytes, sizeof(raw));
  if (static_cast<uint32_t>(raw[0]) == kLlama2cMagic)
    fail(kComponent, path, ": a llama2.c version-", raw[1],
         " export (magic \"ak42\"); only the legacy format (export.py --version 0) is supported");
  h.dim = raw[0];
  h.hidden_dim = raw[1];
  h.n_layers = raw[2];
  h.n_heads = raw[3];
  h.n_kv_heads = raw[4];
  h.vocab_size = raw[5];
  h.seq_len = raw[6];
  ModelConfig c = llama2c_config(h, path);
  const uint64_t want = llama2c_file_bytes(h);
  if (size != want)
    fail(kComponent, path, ": the file has ", size, " bytes but its header (dim ", h.dim,
         ", hidden_dim ", h.hidden_dim, ", n_layers ", h.n_layers, ", n_heads ", h.n_heads,
         ", n_kv_heads ", h.n_kv_heads, ", vocab_size ", h.vocab_size, ", seq_len ", h.seq_len,
         ") implies ", want, size < want ? " (truncated?)" : "");

  const int64_t dim = c.hidden_size, hidden = c.intermediate_size, layers = c.num_hidden_layers;
  const int64_t kv_dim = c.kv_dim(), vocab = c.vocab_size;
  std::vector<MappedTensor> tensors;
  size_t offset = kLlama2cHeaderBytes;
  // Each array is [layers, shape...]; layer i's tensor lies at base + i x numel x 4.
  auto add_array = [&](const std::string& suffix, Shape shape, int64_t count) {
    const size_t bytes = static_cast<size_t>(shape_numel(shape)) * 4;
    for (int64_t i = 0; i < count; ++i) {
      MappedTensor t;
      t.name = names::layer(i, suffix);
      t.dtype_name = "F32";
      t.dtype = DType::F32;
      t.shape = shape;
      t.begin = offset + static_cast<size_t>(i) * bytes;
      t.end = t.begin + bytes;
      tensors.push_back(std::move(t));
    }
    offset += static_cast<size_t>(count) * bytes;
  };
  auto add_global = [&](const char* name, Shape shape) {
    MappedTensor t;
    t.name = name;
    t.dtype_name = "F32";
    t.dtype = DType::F32;
    t.shape = std::move(shape);
    t.begin = offset;
    t.end = offset + static_cast<size_t>(shape_numel(t.shape)) * 4;
    offset = t.end;
    tensors.push_back(std::move(t));
  };
  add_global(names::kEmbed, {vocab, dim});
  add_array("input_layernorm.weight", {dim}, layers);
  add_array("self_attn.q_proj.weight", {c.q_dim(), dim}, layers);
  add_array("self_attn.k_proj.weight", {kv_dim, dim}, layers);
  add_array("self_attn.v_proj.weight", {kv_dim, dim}, layers);
  add_array("self_attn.o_proj.weight", {dim, c.q_dim()}, layers);
  add_array("post_attention_layernorm.weight", {dim}, layers);
  add_array("mlp.gate_proj.weight", {hidden, dim}, layers);  // w1
  add_array("mlp.down_proj.weight", {dim, hidden}, layers);  // w2
  add_array("mlp.up_proj.weight", {hidden, dim}, layers);    // w3
  add_global(names::kNorm, {dim});
  offset += static_cast<size_t>(c.max_position_embeddings * c.head_dim) * 4;  // RoPE tables
  if (!c.tie_word_embeddings) add_global(names::kLmHead, {vocab, dim});

  if (config) *config = c;
  return tensors;
}

std::unique_ptr<WeightSource> open_llama2c(const std::string& path, ModelConfig* config) {
  auto file = std::make_shared<const MappedFile>(path);
  std::vector<MappedTensor> tensors = llama2c_tensors(file->data(), file->size(), path, config);
  return std::make_unique<MappedTensorSource>(
      kComponent, path, std::vector<std::shared_ptr<const MappedFile>>{file}, std::move(tensors));
}

}  // namespace parallm
