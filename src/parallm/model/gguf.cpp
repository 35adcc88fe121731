#include "parallm/model/gguf.h"

#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <set>

#include "parallm/core/checked.h"
#include "parallm/core/error.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/bpe_split.h"
#include "parallm/model/tokenizer.h"
#include "parallm/model/tokenizer_hf.h"
#include "parallm/model/tokenizer_unicode.h"
#include "parallm/model/tokenizer_spm.h"

namespace parallm {
namespace {

constexpr const char* kComponent = "gguf";
constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian

// Reads fields from the header bytes, checking each against the bytes left.
class Cursor {
 public:
  Cursor(const uint8_t* p, size_t n, const std::string& source) : p_(p), n_(n), src_(source) {}
  size_t pos() const { return pos_; }
  size_t left() const { return n_ - pos_; }

  void need(size_t k, const std::string& field) const {
    if (k > left())
      fail(kComponent, src_, ": truncated at byte ", pos_, ": ", field, " needs ", k, " bytes, ",
           left(), " left");
  }
  template <class T>
  T get(const std::string& field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str(const std::string& field) {
    const uint64_t len = get<uint64_t>(field + " length");
    if (len > left())
      fail(kComponent, src_, ": ", field, " length ", len, " exceeds the ", left(),
           " bytes left in the file");
    std::string s(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  const std::string& src_;
};

size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::Bool:
      return 1;
    case GgufType::U16:
    case GgufType::I16:
      return 2;
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::F32:
      return 4;
    case GgufType::U64:
    case GgufType::I64:
    case GgufType::F64:
      return 8;
    case GgufType::String:
      return 8;  // at least its length
    case GgufType::Array:
      return 12;  // at least its element type and count
  }
  return 1;
}

GgufType value_type(uint32_t t, const std::string& source, const std::string& key) {
  if (t > static_cast<uint32_t>(GgufType::F64))
    fail(kComponent, source, ": metadata \"", key, "\": value type ", t,
         " is not a GGUF type (0..12)");
  return static_cast<GgufType>(t);
}

GgufValue read_value(Cursor& c, GgufType t, const std::string& source, const std::string& key,
                     uint64_t depth) {
  GgufValue v;
  v.type = t;
  const std::string what = cat("metadata \"", key, "\"");
  switch (t) {
    case GgufType::U8:
      v.i = c.get<uint8_t>(what);
      break;
    case GgufType::I8:
      v.i = c.get<int8_t>(what);
      break;
    case GgufType::U16:
      v.i = c.get<uint16_t>(what);
      break;
    case GgufType::I16:
      v.i = c.get<int16_t>(what);
      break;
    case GgufType::U32:
      v.i = c.get<uint32_t>(what);
      break;
    case GgufType::I32:
      v.i = c.get<int32_t>(what);
      break;
    case GgufType::U64:
      v.i = static_cast<int64_t>(c.get<uint64_t>(what));
      break;
    case GgufType::I64:
      v.i = c.get<int64_t>(what);
      break;
    case GgufType::F32:
      v.f = c.get<float>(what);
      break;
    case GgufType::F64:
      v.f = c.get<double>(what);
      break;
    case GgufType::Bool: {
      const uint8_t b = c.get<uint8_t>(what);
      if (b > 1) fail(kComponent, source, ": ", what, ": bool value ", int{b}, " is not 0 or 1");
      v.i = b;
      break;
    }
    case GgufType::String:
      v.s = c.str(what);
      break;
    case GgufType::Array: {
      if (depth >= kGgufMaxArrayDepth)
        fail(kComponent, source, ": ", what, ": arrays nested deeper than ", kGgufMaxArrayDepth);
      v.elem = value_type(c.get<uint32_t>(what + " array type"), source, key);
      const uint64_t n = c.get<uint64_t>(what + " array count");
      if (n > c.left() / scalar_size(v.elem))
        fail(kComponent, source, ": ", what, ": array count ", n, " of ", gguf_type_name(v.elem),
             " exceeds the ", c.left(), " bytes left in the file");
      v.items.reserve(static_cast<size_t>(n));
      for (uint64_t i = 0; i < n; ++i)
        v.items.push_back(read_value(c, v.elem, source, key, depth + 1));
      break;
    }
  }
  return v;
}

}  // namespace

std::string gguf_type_name(GgufType t) {
  static const char* names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? names[i] : cat("type ", i);
}

GgufValue GgufValue::array(GgufType elem, std::vector<GgufValue> items) {
  GgufValue v;
  v.type = GgufType::Array;
  v.elem = elem;
  v.items = std::move(items);
  return v;
}

bool GgufValue::is_int() const {
  switch (type) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::U16:
    case GgufType::I16:
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::U64:
    case GgufType::I64:
      return true;
    default:
      return false;
  }
}
bool GgufValue::is_float() const {
  return type == GgufType::F32 || type == GgufType::F64;
}

const GgufValue* GgufHeader::find(const std::string& key) const {
  for (const auto& [k, v] : metadata)
    if (k == key) return &v;
  return nullptr;
}

uint32_t gguf_ggml_type(DType t) {
  switch (t) {
    case DType::F32:
      return 0;
    case DType::F16:
      return 1;
    case DType::Q4_0:
      return 2;
    case DType::Q8_0:
      return 8;
    case DType::Q4_K:
      return 12;
    case DType::Q5_K:
      return 13;
    case DType::Q6_K:
      return 14;
    case DType::BF16:
      return 30;
    default:
      fail(kComponent, "dtype ", dtype_name(t), " has no GGUF tensor type");
  }
}

DType dtype_of_ggml_type(uint32_t type, const std::string& what) {
  switch (type) {
    case 0:
      return DType::F32;
    case 1:
      return DType::F16;
    case 2:
      return DType::Q4_0;
    case 8:
      return DType::Q8_0;
    case 12:
      return DType::Q4_K;
    case 13:
      return DType::Q5_K;
    case 14:
      return DType::Q6_K;
    case 30:
      return DType::BF16;
    default:
      fail(kComponent, what, ": ggml type ", type,
           " is not supported (F32 0, F16 1, Q4_0 2, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30)");
  }
}

GgufHeader parse_gguf(const uint8_t* bytes, size_t size, const std::string& source) {
  Cursor c(bytes, size, source);
  GgufHeader h;
  const uint32_t magic = c.get<uint32_t>("magic");
  if (magic != kMagic)
    fail(
        kComponent, source, ": bad magic 0x",
        [&] {
          char buf[16];
          std::snprintf(buf, sizeof buf, "%08x", magic);
          return std::string(buf);
        }(),
        " (a GGUF file starts with \"GGUF\")");
  h.version = c.get<uint32_t>("version");
  if (h.version != 2 && h.version != 3)
    fail(kComponent, source, ": version ", h.version, " is not supported (2 or 3)");
  const uint64_t n_tensors = c.get<uint64_t>("tensor_count");
  const uint64_t n_kv = c.get<uint64_t>("kv_count");
  // Each metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, each tensor info at
  // least 8 + 4 + 8 + 4 + 8.
  if (n_kv > c.left() / 13)
    fail(kComponent, source, ": kv_count ", n_kv, " exceeds what the ", c.left(),
         " bytes left can hold");
  if (n_tensors > c.left() / 32)
    fail(kComponent, source, ": tensor_count ", n_tensors, " exceeds what the ", c.left(),
         " bytes left can hold");
  std::set<std::string> keys;
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.str(cat("metadata key #", i));
    if (!keys.insert(key).second)
      fail(kComponent, source, ": metadata key \"", key, "\" appears twice");
    const GgufType t = value_type(c.get<uint32_t>(cat("metadata \"", key, "\" type")), source, key);
    GgufValue v = read_value(c, t, source, key, 0);
    h.metadata.emplace_back(std::move(key), std::move(v));
  }
  if (const GgufValue* a = h.find("general.alignment")) {
    if (a->type != GgufType::U32)
      fail(kComponent, source, ": general.alignment has type ", gguf_type_name(a->type),
           ", not u32");
    if (a->i == 0 || (a->i & (a->i - 1)) != 0)
      fail(kComponent, source, ": general.alignment ", a->i, " is not a power of two");
    h.alignment = static_cast<uint64_t>(a->i);
  }
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = c.str(cat("tensor #", i, " name"));
    const std::string what = cat("tensor \"", t.name, "\"");
    if (!names.insert(t.name).second) fail(kComponent, source, ": ", what, " appears twice");
    const uint32_t nd = c.get<uint32_t>(what + " n_dims");
    if (nd == 0 || nd > kGgufMaxDims)
      fail(kComponent, source, ": ", what, ": n_dims ", nd, " is not within 1..", kGgufMaxDims);
    std::vector<int64_t> ne(nd);
    int64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t v = c.get<uint64_t>(cat(what, " ne[", d, "]"));
      if (v == 0 || v > (uint64_t{1} << 40))
        fail(kComponent, source, ": ", what, ": ne[", d, "] = ", v, " is not within 1..2^40");
      ne[d] = static_cast<int64_t>(v);
      numel = checked_mul<int64_t>(numel, ne[d], cat(source, ": ", what, " element count"));
    }
    t.shape.assign(ne.rbegin(), ne.rend());
    t.dtype = dtype_of_ggml_type(c.get<uint32_t>(what + " type"), cat(source, ": ", what));
    const int64_t block = dtype_block(t.dtype);
    if (ne[0] % block != 0)
      fail(kComponent, source, ": ", what, ": row length ne[0] = ", ne[0], " is not a multiple of ",
           dtype_name(t.dtype), "'s ", block, "-value block");
    t.offset = c.get<uint64_t>(what + " offset");
    if (t.offset % h.alignment != 0)
      fail(kComponent, source, ": ", what, ": offset ", t.offset,
           " is not a multiple of the alignment ", h.alignment);
    t.nbytes = checked_mul<uint64_t>(static_cast<uint64_t>(numel / block), dtype_size(t.dtype),
                                     cat(source, ": ", what, " bytes"));
    h.tensors.push_back(std::move(t));
  }
  h.data_start = (c.pos() + h.alignment - 1) / h.alignment * h.alignment;
  if (h.data_start > size && !h.tensors.empty())
    fail(kComponent, source, ": the data section would start at byte ", h.data_start,
         " but the file has ", size);
  // Offsets inside the file, no two tensors overlapping.
  std::vector<const GgufTensorInfo*> by_offset;
  for (GgufTensorInfo& t : h.tensors) {
    const uint64_t room = size >= h.data_start ? size - h.data_start : 0;
    if (t.offset > room || t.nbytes > room - t.offset)
      fail(kComponent, source, ": tensor \"", t.name, "\": bytes [", t.offset, ", +", t.nbytes,
           ") of the data section are outside the file (", room, " data bytes)");
    t.offset += h.data_start;
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto* a, const auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo& a = *by_offset[i - 1];
    const GgufTensorInfo& b = *by_offset[i];
    if (a.offset + a.nbytes > b.offset)
      fail(kComponent, source, ": tensors \"", a.name, "\" and \"", b.name, "\" overlap (bytes ",
           a.offset, "+", a.nbytes, " and ", b.offset, ")");
  }
  return h;
}

namespace {

void put_bytes(std::string& out, const void* p, size_t n) {
  out.append(static_cast<const char*>(p), n);
}
template <class T>
void put(std::string& out, T v) {
  put_bytes(out, &v, sizeof v);
}
void put_str(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

void put_value(std::string& out, const GgufValue& v, const std::string& key) {
  switch (v.type) {
    case GgufType::U8:
      return put<uint8_t>(out, static_cast<uint8_t>(v.i));
    case GgufType::I8:
      return put<int8_t>(out, static_cast<int8_t>(v.i));
    case GgufType::U16:
      return put<uint16_t>(out, static_cast<uint16_t>(v.i));
    case GgufType::I16:
      return put<int16_t>(out, static_cast<int16_t>(v.i));
    case GgufType::U32:
      return put<uint32_t>(out, static_cast<uint32_t>(v.i));
    case GgufType::I32:
      return put<int32_t>(out, static_cast<int32_t>(v.i));
    case GgufType::U64:
      return put<uint64_t>(out, static_cast<uint64_t>(v.i));
    case GgufType::I64:
      return put<int64_t>(out, v.i);
    case GgufType::F32:
      return put<float>(out, static_cast<float>(v.f));
    case GgufType::F64:
      return put<double>(out, v.f);
    case GgufType::Bool:
      return put<uint8_t>(out, v.i ? 1 : 0);
    case GgufType::String:
      return put_str(out, v.s);
    case GgufType::Array:
      put<uint32_t>(out, static_cast<uint32_t>(v.elem));
      put<uint64_t>(out, v.items.size());
      for (const GgufValue& it : v.items) {
        if (it.type != v.elem)
          fail(kComponent, "metadata \"", key, "\": an array of ", gguf_type_name(v.elem),
               " holds a ", gguf_type_name(it.type));
        put_value(out, it, key);
      }
      return;
  }
}

}  // namespace

void write_gguf(const std::string& path,
                const std::vector<std::pair<std::string, GgufValue>>& metadata,
                const std::vector<std::pair<std::string, Tensor>>& tensors) {
  uint64_t alignment = 32;
  for (const auto& [k, v] : metadata)
    if (k == "general.alignment") alignment = static_cast<uint64_t>(v.i);
  std::string head;
  put<uint32_t>(head, kMagic);
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors.size());
  put<uint64_t>(head, metadata.size());
  for (const auto& [k, v] : metadata) {
    put_str(head, k);
    put<uint32_t>(head, static_cast<uint32_t>(v.type));
    put_value(head, v, k);
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const auto& [name, t] : tensors) {
    if (!t.is_contiguous() || t.ndim() < 1 || t.ndim() > static_cast<int>(kGgufMaxDims))
      fail(kComponent, path, ": tensor \"", name, "\" ", t.describe(),
           " is not a contiguous 1-4 dimensional tensor");
    put_str(head, name);
    put<uint32_t>(head, static_cast<uint32_t>(t.ndim()));
    for (int d = t.ndim() - 1; d >= 0; --d) put<uint64_t>(head, static_cast<uint64_t>(t.dim(d)));
    put<uint32_t>(head, gguf_ggml_type(t.dtype()));
    put<uint64_t>(head, offset);
    offsets.push_back(offset);
    offset = (offset + t.nbytes() + alignment - 1) / alignment * alignment;
  }
  head.resize((head.size() + alignment - 1) / alignment * alignment, '\0');

  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail(kComponent, path, ": cannot create ", tmp);
  bool ok = std::fwrite(head.data(), 1, head.size(), f) == head.size();
  uint64_t at = 0;
  static const char zeros[64] = {};
  for (size_t i = 0; ok && i < tensors.size(); ++i) {
    while (ok && at < offsets[i]) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(sizeof zeros, offsets[i] - at));
      ok = std::fwrite(zeros, 1, n, f) == n;
      at += n;
    }
    const Tensor& t = tensors[i].second;
    ok = ok && std::fwrite(t.raw(), 1, t.nbytes(), f) == t.nbytes();
    at += t.nbytes();
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    fail<std::runtime_error>(kComponent, path, ": write failed");
  }
  std::filesystem::rename(tmp, path);
}

GgufFile open_gguf(const std::string& path) {
  GgufFile g;
  g.file = std::make_shared<const MappedFile>(path);
  g.header = parse_gguf(g.file->data(), g.file->size(), path);
  return g;
}

// ---- LLaMA files

namespace {

int64_t meta_int(const GgufHeader& h, const std::string& key, const std::string& source,
                 std::optional<int64_t> fallback = std::nullopt) {
  const GgufValue* v = h.find(key);
  if (!v) {
    if (fallback) return *fallback;
    fail(kComponent, source, ": metadata \"", key, "\" is missing");
  }
  if (!v->is_int())
    fail(kComponent, source, ": metadata \"", key, "\" has type ", gguf_type_name(v->type),
         ", not an integer");
  return v->i;
}

double meta_float(const GgufHeader& h, const std::string& key, const std::string& source,
                  double fallback) {
  const GgufValue* v = h.find(key);
  if (!v) return fallback;
  if (!v->is_float())
    fail(kComponent, source, ": metadata \"", key, "\" has type ", gguf_type_name(v->type),
         ", not a float");
  return v->f;
}

// HF suffix of a layer tensor <-> llama.cpp's.
const std::pair<const char*, const char*> kLayerNames[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
    {"block_sparse_moe.gate.weight", "ffn_gate_inp.weight"},
};

// Mixtral's expert matrices <-> llama.cpp's, which stacks each kind over the experts in one 3-D
// tensor per layer ([E, rows, cols] in PyTorch order).
const std::pair<const char*, const char*> kExpertNames[] = {
    {"w1.weight", "ffn_gate_exps.weight"},
    {"w2.weight", "ffn_down_exps.weight"},
    {"w3.weight", "ffn_up_exps.weight"},
};

}  // namespace

std::string gguf_expert_name_of(const std::string& hf, int64_t* expert) {
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return "";
  const size_t dot = hf.find('.', prefix.size());
  if (dot == std::string::npos) return "";
  const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
  const std::string mid = ".block_sparse_moe.experts.";
  if (hf.compare(dot, mid.size(), mid) != 0) return "";
  const size_t e0 = dot + mid.size(), e1 = hf.find('.', e0);
  if (e1 == std::string::npos || e1 == e0) return "";
  const std::string num = hf.substr(e0, e1 - e0);
  if (num.find_first_not_of("0123456789") != std::string::npos || num.size() > 9) return "";
  const std::string suffix = hf.substr(e1 + 1);
  for (const auto& [h, g] : kExpertNames)
    if (suffix == h) {
      if (expert) *expert = std::stoll(num);
      return cat("blk.", layer, ".", g);
    }
  return "";
}

std::string gguf_name_of(const std::string& hf) {
  if (hf == names::kEmbed) return "token_embd.weight";
  if (hf == names::kNorm) return "output_norm.weight";
  if (hf == names::kLmHead) return "output.weight";
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return "";
  const size_t dot = hf.find('.', prefix.size());
  if (dot == std::string::npos) return "";
  const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
  const std::string suffix = hf.substr(dot + 1);
  for (const auto& [h, g] : kLayerNames)
    if (suffix == h) return cat("blk.", layer, ".", g);
  return "";
}

ModelConfig gguf_llama_config(const GgufHeader& h, const std::string& source) {
  const GgufValue* arch = h.find("general.architecture");
  if (!arch || arch->type != GgufType::String)
    fail(kComponent, source, ": metadata \"general.architecture\" is missing or not a string");
  if (arch->s != "llama")
    fail(kComponent, source, ": general.architecture \"", arch->s, "\" is not supported (llama)");
  ModelConfig c;
  c.hidden_size = meta_int(h, "llama.embedding_length", source);
  c.intermediate_size = meta_int(h, "llama.feed_forward_length", source);
  c.num_hidden_layers = meta_int(h, "llama.block_count", source);
  c.num_attention_heads = meta_int(h, "llama.attention.head_count", source);
  c.num_key_value_heads =
      meta_int(h, "llama.attention.head_count_kv", source, c.num_attention_heads);
  c.max_position_embeddings = meta_int(h, "llama.context_length", source, 2048);
  c.rms_norm_eps = meta_float(h, "llama.attention.layer_norm_rms_epsilon", source, 1e-5);
  c.rope_theta = meta_float(h, "llama.rope.freq_base", source, 10000.0);
  if (c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0)
    fail(kComponent, source, ": llama.attention.head_count ", c.num_attention_heads,
         " does not divide llama.embedding_length ", c.hidden_size);
  c.head_dim = c.hidden_size / c.num_attention_heads;
  c.rope_interleaved = true;  // llama.cpp's q/k row order: RoPE on adjacent pairs
  // No single checkpoint dtype: a GGUF mixes f32 norms with f16 or quantized matrices, so the
  // weight checker's per-tensor dtype check is off ("") and --dtype auto reads unquantized
  // matrices as bf16.
  c.torch_dtype = "";
  // Vocabulary: the embedding's rows.
  const GgufTensorInfo* embd = nullptr;
  bool has_output = false;
  for (const GgufTensorInfo& t : h.tensors) {
    if (t.name == "token_embd.weight") embd = &t;
    if (t.name == "output.weight") has_output = true;
  }
  if (!embd) fail(kComponent, source, ": tensor \"token_embd.weight\" is missing");
  if (embd->shape.size() != 2)
    fail(kComponent, source, ": token_embd.weight has shape ", shape_str(embd->shape), ", not 2-D");
  c.vocab_size = embd->shape[0];
  c.tie_word_embeddings = !has_output;
  // Mixtral-style MoE (llama.cpp writes Mixtral under the llama architecture): the experts' count
  // and how many each token uses; the router renormalises its top-k weights, as Mixtral's does.
  if (const int64_t e = meta_int(h, "llama.expert_count", source, 0); e > 0) {
    c.model_type = "mixtral";
    c.num_local_experts = e;
    c.num_experts_per_tok = meta_int(h, "llama.expert_used_count", source);
    c.norm_topk_prob = true;
  }
  c.bos_token_id = meta_int(h, "tokenizer.ggml.bos_token_id", source, 1);
  c.eos_token_ids = {meta_int(h, "tokenizer.ggml.eos_token_id", source, 2)};
  c.validate(source);
  return c;
}

std::unique_ptr<WeightSource> open_gguf_llama(const std::string& path, ModelConfig* config) {
  GgufFile g = open_gguf(path);
  const ModelConfig c = gguf_llama_config(g.header, path);
  std::vector<MappedTensor> tensors;
  std::map<std::string, const GgufTensorInfo*> by_name;
  for (const GgufTensorInfo& t : g.header.tensors) by_name[t.name] = &t;
  // Every table tensor (lm_head when the file has output.weight) under its HF name.
  for (const LlamaTensor& table_entry : llama_tensors(c)) {
    const std::string& hf = table_entry.name;
    int64_t expert = -1;
    std::string gg = gguf_name_of(hf);
    if (gg.empty()) gg = gguf_expert_name_of(hf, &expert);
    auto it = by_name.find(gg);
    if (it == by_name.end()) continue;  // check_llama_weights names what is missing
    const GgufTensorInfo& t = *it->second;
    MappedTensor m;
    m.name = hf;
    m.file = 0;
    m.dtype_name = std::string(dtype_name(t.dtype));
    m.dtype = t.dtype;
    m.shape = t.shape;
    m.begin = static_cast<size_t>(t.offset);
    m.end = static_cast<size_t>(t.offset + t.nbytes);
    if (expert >= 0) {
      // Expert e of a stacked [E, rows, cols] tensor: its e-th contiguous slice (each expert's
      // rows are whole blocks, so the slices are whole bytes).
      if (t.shape.size() != 3 || t.shape[0] != c.num_local_experts)
        fail(kComponent, path, ": ", gg, " has shape ", shape_str(t.shape), ", not [",
             c.num_local_experts, " experts (llama.expert_count), rows, cols]");
      const size_t per = static_cast<size_t>(t.nbytes / t.shape[0]);
      m.shape = {t.shape[1], t.shape[2]};
      m.begin = static_cast<size_t>(t.offset) + static_cast<size_t>(expert) * per;
      m.end = m.begin + per;
    }
    tensors.push_back(std::move(m));
  }
  if (config) *config = c;
  return std::make_unique<MappedTensorSource>(
      "gguf", path, std::vector<std::shared_ptr<const MappedFile>>{g.file}, std::move(tensors));
}

// ---- tokenizer

namespace {

// Protocol buffers' wire format, enough to write a sentencepiece ModelProto.
void pb_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}
void pb_key(std::string& out, int field, int wire) {
  pb_varint(out, (uint64_t(field) << 3) | wire);
}
void pb_int(std::string& out, int field, int64_t v) {  // int32/enum/bool: negatives as 10 bytes
  pb_key(out, field, 0);
  pb_varint(out, static_cast<uint64_t>(v));
}
void pb_bytes(std::string& out, int field, const std::string& b) {
  pb_key(out, field, 2);
  pb_varint(out, b.size());
  out += b;
}
void pb_float(std::string& out, int field, float f) {
  pb_key(out, field, 5);
  put_bytes(out, &f, 4);
}

const GgufValue* array_of(const GgufHeader& h, const std::string& key, GgufType elem,
                          const std::string& source, size_t count) {
  const GgufValue* v = h.find(key);
  if (!v) return nullptr;
  if (v->type != GgufType::Array || v->elem != elem)
    fail(kComponent, source, ": ", key, " is not an array of ", gguf_type_name(elem));
  if (count != SIZE_MAX && v->items.size() != count)
    fail(kComponent, source, ": ", key, " has ", v->items.size(), " entries for ", count,
         " tokens");
  return v;
}

}  // namespace

namespace {

// A token id from the tokenizer.ggml.* metadata: `fallback` when the key is absent; -1 (none) or
// an id of the n-token vocabulary, else one line naming the key.
int64_t vocab_id(const GgufHeader& h, const char* key, const std::string& source, size_t n,
                 int64_t fallback) {
  const int64_t v = meta_int(h, key, source, fallback);
  if (v < -1 || v >= static_cast<int64_t>(n))
    fail(kComponent, source, ": ", key, " ", v, " is outside the ", n, "-token vocabulary");
  return v;
}

// Qwen2's split: LLaMA-3's with single digits.
constexpr std::string_view kQwen2SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// tokenizer.ggml.model "gpt2": byte-level BPE, the tokens in GPT-2's byte-to-unicode alphabet,
// tokenizer.ggml.merges as "a b" in rank order, the pre-tokenizer named by tokenizer.ggml.pre.
// Written as the tokenizer.json that says the same and run by tokenizer_hf (one BPE for both).
std::unique_ptr<Tokenizer> gguf_bpe_tokenizer(const GgufHeader& h, const std::string& source) {
  const GgufValue* tokens =
      array_of(h, "tokenizer.ggml.tokens", GgufType::String, source, SIZE_MAX);
  if (!tokens || tokens->items.empty())
    fail(kComponent, source,
         ": tokenizer.ggml.model is \"gpt2\" but tokenizer.ggml.tokens is missing or empty");
  const size_t n = tokens->items.size();
  const GgufValue* types = array_of(h, "tokenizer.ggml.token_type", GgufType::I32, source, n);
  const GgufValue* merges =
      array_of(h, "tokenizer.ggml.merges", GgufType::String, source, SIZE_MAX);
  if (!merges)
    fail(kComponent, source,
         ": tokenizer.ggml.model is \"gpt2\" but tokenizer.ggml.merges is missing");
  std::string pre = "default";
  if (const GgufValue* p = h.find("tokenizer.ggml.pre")) {
    if (p->type != GgufType::String)
      fail(kComponent, source, ": tokenizer.ggml.pre has type ", gguf_type_name(p->type),
           ", not a string");
    pre = p->s;
  }
  nlohmann::json vocab = nlohmann::json::object(), added = nlohmann::json::array();
  for (size_t i = 0; i < n; ++i) {
    // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte (llama.cpp's types).
    const int64_t type = types ? types->items[i].i : 1;
    if (type < 1 || type > 6)
      fail(kComponent, source, ": tokenizer.ggml.token_type[", i, "] = ", type,
           " is not a token type (1..6)");
    const std::string& piece = tokens->items[i].s;
    if (unicode::sanitize_utf8(piece) != piece)  // byte-level tokens are always valid UTF-8
      fail(kComponent, source, ": tokenizer.ggml.tokens[", i, "] is not valid UTF-8");
    if (type == 3 || type == 4) {  // matched in the text before the split, as added tokens
      added.push_back({{"id", i},
                       {"content", piece},
                       {"special", type == 3},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false}});
    } else if (!vocab.contains(piece)) {
      vocab[piece] = i;
    }
  }
  nlohmann::json merge_list = nlohmann::json::array();
  for (size_t i = 0; i < merges->items.size(); ++i) {
    const std::string& m = merges->items[i].s;
    if (unicode::sanitize_utf8(m) != m)
      fail(kComponent, source, ": tokenizer.ggml.merges[", i, "] is not valid UTF-8");
    merge_list.push_back(m);
  }
  const nlohmann::json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}};
  auto split_then_bytes = [&](std::string_view regex) {
    return nlohmann::json{
        {"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"Regex", std::string(regex)}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          byte_level}}};
  };
  nlohmann::json pre_tokenizer;
  bool ignore_merges = false;
  if (pre == "default" || pre == "gpt2") {
    pre_tokenizer = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  } else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") {
    pre_tokenizer = split_then_bytes(kLlama3SplitRegex);
    ignore_merges = true;
  } else if (pre == "qwen2") {
    pre_tokenizer = split_then_bytes(kQwen2SplitRegex);
  } else {
    fail(kComponent, source, ": tokenizer.ggml.pre \"", pre,
         "\" is not supported (supported: default, gpt2, llama-bpe, llama3, llama-v3, qwen2)");
  }
  const nlohmann::json doc = {{"added_tokens", added},
                              {"normalizer", nullptr},
                              {"pre_tokenizer", pre_tokenizer},
                              {"decoder", {{"type", "ByteLevel"}}},
                              {"model",
                               {{"type", "BPE"},
                                {"vocab", vocab},
                                {"merges", merge_list},
                                {"byte_fallback", false},
                                {"ignore_merges", ignore_merges}}}};
  auto id = [&](const char* key) { return static_cast<int32_t>(vocab_id(h, key, source, n, -1)); };
  HfSpecialIds ids;
  // llama.cpp adds BOS to a gpt2 vocabulary only when the file says so.
  const GgufValue* add_bos = h.find("tokenizer.ggml.add_bos_token");
  if (add_bos && add_bos->type != GgufType::Bool)
    fail(kComponent, source, ": tokenizer.ggml.add_bos_token has type ",
         gguf_type_name(add_bos->type), ", not a bool");
  if (add_bos && add_bos->i != 0) ids.bos = id("tokenizer.ggml.bos_token_id");
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"})
    if (const int32_t e = id(key); e >= 0) ids.eos.push_back(e);
  try {
    return parse_hf_tokenizer(doc.dump(), source, &ids);
  } catch (const std::invalid_argument& e) {
    fail(kComponent, source, ": the tokenizer.ggml.* BPE vocabulary is not valid: ", e.what());
  }
}

}  // namespace

std::unique_ptr<Tokenizer> gguf_tokenizer(const GgufHeader& h, const std::string& source) {
  const GgufValue* model = h.find("tokenizer.ggml.model");
  if (model && model->type == GgufType::String && model->s == "gpt2")
    return gguf_bpe_tokenizer(h, source);
  if (!model || model->type != GgufType::String || model->s != "llama") return nullptr;
  const GgufValue* tokens =
      array_of(h, "tokenizer.ggml.tokens", GgufType::String, source, SIZE_MAX);
  if (!tokens || tokens->items.empty())
    fail(kComponent, source,
         ": tokenizer.ggml.model is \"llama\" but tokenizer.ggml.tokens is "
         "missing or empty");
  const size_t n = tokens->items.size();
  const GgufValue* scores = array_of(h, "tokenizer.ggml.scores", GgufType::F32, source, n);
  const GgufValue* types = array_of(h, "tokenizer.ggml.token_type", GgufType::I32, source, n);
  auto id = [&](const char* key, int64_t fallback) {
    return vocab_id(h, key, source, n, fallback);
  };
  const int64_t unk = id("tokenizer.ggml.unknown_token_id", 0);
  const int64_t bos = id("tokenizer.ggml.bos_token_id", 1);
  const int64_t eos = id("tokenizer.ggml.eos_token_id", 2);
  std::string proto;
  bool byte_fallback = false;
  for (size_t i = 0; i < n; ++i) {
    // GGUF's token types are sentencepiece's: 1 normal, 2 unknown, 3 control, 4 user defined,
    // 5 unused, 6 byte.
    int64_t type = types ? types->items[i].i : 1;
    if (!types && static_cast<int64_t>(i) == unk) type = 2;
    if (!types && (static_cast<int64_t>(i) == bos || static_cast<int64_t>(i) == eos)) type = 3;
    if (type < 1 || type > 6)
      fail(kComponent, source, ": tokenizer.ggml.token_type[", i, "] = ", type,
           " is not a token type (1..6)");
    byte_fallback |= type == 6;
    std::string piece;
    pb_bytes(piece, 1, tokens->items[i].s);
    pb_float(piece, 2, scores ? static_cast<float>(scores->items[i].f) : 0.0f);
    pb_int(piece, 3, type);
    pb_bytes(proto, 1, piece);
  }
  std::string trainer;
  pb_int(trainer, 3, 2);  // model_type: BPE (merges by piece score)
  pb_int(trainer, 4, static_cast<int64_t>(n));
  pb_int(trainer, 35, byte_fallback ? 1 : 0);
  pb_int(trainer, 40, unk);
  pb_int(trainer, 41, bos);
  pb_int(trainer, 42, eos);
  pb_int(trainer, 43, -1);  // pad_id
  pb_bytes(proto, 2, trainer);
  std::string normalizer;
  pb_bytes(normalizer, 1, "identity");
  pb_int(normalizer, 3, 1);  // add_dummy_prefix
  pb_int(normalizer, 4, 0);  // remove_extra_whitespaces
  pb_int(normalizer, 5, 1);  // escape_whitespaces
  pb_bytes(proto, 3, normalizer);
  try {
    return parse_sentencepiece_tokenizer(proto, source);
  } catch (const std::runtime_error& e) {
    fail(kComponent, source,
         ": the tokenizer.ggml.* vocabulary is not a valid sentencepiece "
         "model: ",
         e.what());
  }
}

std::vector<std::pair<std::string, GgufValue>> gguf_tokenizer_metadata(const std::string& file) {
  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(file).ok()) return {};
  std::vector<GgufValue> tokens, scores, types;
  for (int i = 0; i < sp.GetPieceSize(); ++i) {
    tokens.push_back(GgufValue::str(sp.IdToPiece(i)));
    scores.push_back(GgufValue::f32(sp.GetScore(i)));
    const int type = sp.IsUnknown(i)   ? 2
                     : sp.IsControl(i) ? 3
                     : sp.IsUnused(i)  ? 5
                     : sp.IsByte(i)    ? 6
                                       : 1;
    types.push_back(GgufValue::i32(type));
  }
  std::vector<std::pair<std::string, GgufValue>> out = {
      {"tokenizer.ggml.model", GgufValue::str("llama")},
      {"tokenizer.ggml.tokens", GgufValue::array(GgufType::String, std::move(tokens))},
      {"tokenizer.ggml.scores", GgufValue::array(GgufType::F32, std::move(scores))},
      {"tokenizer.ggml.token_type", GgufValue::array(GgufType::I32, std::move(types))}};
  if (sp.unk_id() >= 0)
    out.push_back({"tokenizer.ggml.unknown_token_id", GgufValue::u32(sp.unk_id())});
  return out;
}

}  // namespace parallm
