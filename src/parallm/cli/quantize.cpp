// parallm quantize: a model (Hugging Face directory or llama2.c file) -> a LLaMA-architecture GGUF
// with llama.cpp's tensor names, Q/K row order and metadata, matrices quantized to Q8_0, Q4_0,
// Q4_K, Q5_K or Q6_K, or mixed as llama.cpp's Q4_K_M (q4_k_m) and Q5_K_M (q5_k_m).
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>

#include "parallm/cli/command.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"
#include "parallm/model/gguf.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/weights.h"

namespace parallm::cli {
namespace {

struct Options {
  std::string model, type, out;
};

// llama.cpp's convert script permutes Hugging Face's q/k rows (RoPE on the two halves of each
// head) into Meta's order (RoPE on adjacent pairs): within each head, row 2i + j of the result is
// row j * head_dim / 2 + i of the input.
Tensor permute_rope_rows(const Tensor& w, int64_t heads) {
  const int64_t rows = w.dim(0), cols = w.dim(1), hd = rows / heads;
  Tensor out = Tensor::empty(DType::F32, {rows, cols});
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < hd / 2; ++i)
      for (int64_t j = 0; j < 2; ++j)
        std::copy_n(w.data<float>() + (h * hd + j * hd / 2 + i) * cols, cols,
                    out.data<float>() + (h * hd + 2 * i + j) * cols);
  return out;
}

// w (f32 [..., cols]) -> `type`, rows split over the pool (each row whole blocks): the bytes
// of w.to(type), in a fraction of the time (the K types fit their scales, ~100 s a 1B model on
// one thread).
Tensor quantize_rows(const Tensor& w, DType type) {
  Tensor out = Tensor::empty(type, w.shape());
  const int64_t cols = w.dim(w.ndim() - 1), rows = w.numel() / cols;
  const size_t row_bytes = dtype_bytes(type, cols);
  ThreadPool::current().parallel_for(rows, [&](int64_t b, int64_t e) {
    convert(w.data<float>() + b * cols, DType::F32, static_cast<char*>(out.raw()) + b * row_bytes,
            type, static_cast<size_t>((e - b) * cols));
  });
  return out;
}

// llama.cpp's Q4_K_M and Q5_K_M recipes, from its documented per-tensor rules (llama-quantize's
// ftypes 15 and 17), for the LLaMA architecture: every matrix in `base` (Q4_K or Q5_K), except in
// Q6_K the LM head (the embedding when tied), and attn_v and ffn_down in the layers where more
// bits pay most (the first and last eighth, and every third one between: more_bits below); with 8
// experts (Mixtral) attn_k and attn_v in Q8_0 and attn_output in Q5_K. Rows that are not whole
// blocks fall back as in a plain file.
bool more_bits(int64_t layer, int64_t layers) {
  return layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2;
}
DType k_m_type(DType base, const LlamaTensor& t, const ModelConfig& c) {
  const auto has = [&](const char* s) { return t.name.find(s) != std::string::npos; };
  const bool eight_experts = c.is_moe() && c.num_local_experts == 8;
  if (t.part == LlamaPart::LmHead || (t.part == LlamaPart::Embedding && c.tie_word_embeddings))
    return DType::Q6_K;
  if (eight_experts && (has("k_proj") || has("v_proj"))) return DType::Q8_0;
  if (eight_experts && has("o_proj")) return DType::Q5_K;
  const bool down = has("down_proj") || (t.expert >= 0 && has(".w2."));
  if ((has("v_proj") || down) && more_bits(t.layer, c.num_hidden_layers)) return DType::Q6_K;
  return base;
}

// The type a matrix of `cols` columns is stored in when `want` is asked: a block type whose blocks
// do not divide the rows falls back, as llama.cpp's does to another type, to Q8_0 when the rows
// are whole 32-value blocks (a K type's 256 do not divide them), else to f32 (stories260K's FFN
// of 172).
DType stored_type(DType want, int64_t cols, int64_t& as_q8_0, int64_t& kept_f32) {
  if (!is_block(want) || cols % dtype_block(want) == 0) return want;
  if (dtype_block(want) > 32 && cols % 32 == 0) {
    ++as_q8_0;
    return DType::Q8_0;
  }
  ++kept_f32;
  return DType::F32;
}

uint32_t file_type(DType t, bool mix) {        // llama.cpp's general.file_type (LLAMA_FTYPE_*)
  if (mix) return t == DType::Q4_K ? 15 : 17;  // MOSTLY_Q4_K_M, MOSTLY_Q5_K_M
  switch (t) {
    case DType::F32:
      return 0;
    case DType::F16:
      return 1;
    case DType::Q4_0:
      return 2;
    case DType::Q8_0:
      return 7;
    case DType::Q4_K:
      return 14;  // MOSTLY_Q4_K_S (every matrix Q4_K, as llama-quantize --pure writes it)
    case DType::Q5_K:
      return 16;  // MOSTLY_Q5_K_S (likewise)
    case DType::Q6_K:
      return 18;
    case DType::BF16:
      return 32;
    default:
      return 0;
  }
}

int run(const Options& o) {
  // q4_k_m / q5_k_m: the mix on the base type Q4_K / Q5_K.
  const bool mix = o.type == "q4_k_m" || o.type == "q5_k_m";
  const DType type = parse_dtype(mix ? o.type.substr(0, 4) : o.type, "--type");
  ModelConfig c;
  const std::unique_ptr<WeightSource> source = open_model(o.model, &c);
  auto type_of = [&](const LlamaTensor& t) { return mix ? k_m_type(type, t, c) : type; };
  if (c.is_qwen2_moe() || c.attention_bias)
    fail("quantize", o.model, ": only LLaMA and Mixtral models are written (model_type ",
         c.model_type, ")");
  if (!c.rope_scaling.type.empty())
    fail("quantize", o.model, ": rope_scaling \"", c.rope_scaling.type,
         "\" is not written to GGUF yet");
  if (c.head_dim * c.num_attention_heads != c.hidden_size)
    fail("quantize", o.model, ": head_dim ", c.head_dim, " x heads ", c.num_attention_heads,
         " != hidden_size ", c.hidden_size, " (llama.cpp derives head_dim)");
  ThreadPool pool(ThreadPool::hardware_threads());
  ScopedPool scoped(pool);
  Timer timer;

  std::vector<std::pair<std::string, GgufValue>> meta = {
      {"general.architecture", GgufValue::str("llama")},
      {"general.name", GgufValue::str(std::filesystem::path(o.model).filename().string())},
      {"general.file_type", GgufValue::u32(file_type(type, mix))},
      {"general.quantization_version", GgufValue::u32(2)},
      {"llama.vocab_size", GgufValue::u32(static_cast<uint32_t>(c.vocab_size))},
      {"llama.context_length", GgufValue::u32(static_cast<uint32_t>(c.max_position_embeddings))},
      {"llama.embedding_length", GgufValue::u32(static_cast<uint32_t>(c.hidden_size))},
      {"llama.block_count", GgufValue::u32(static_cast<uint32_t>(c.num_hidden_layers))},
      {"llama.feed_forward_length", GgufValue::u32(static_cast<uint32_t>(c.intermediate_size))},
      {"llama.rope.dimension_count", GgufValue::u32(static_cast<uint32_t>(c.head_dim))},
      {"llama.attention.head_count", GgufValue::u32(static_cast<uint32_t>(c.num_attention_heads))},
      {"llama.attention.head_count_kv",
       GgufValue::u32(static_cast<uint32_t>(c.num_key_value_heads))},
      {"llama.attention.layer_norm_rms_epsilon",
       GgufValue::f32(static_cast<float>(c.rms_norm_eps))},
      {"llama.rope.freq_base", GgufValue::f32(static_cast<float>(c.rope_theta))},
      {"tokenizer.ggml.bos_token_id", GgufValue::u32(static_cast<uint32_t>(c.bos_token_id))},
      {"tokenizer.ggml.eos_token_id",
       GgufValue::u32(static_cast<uint32_t>(c.eos_token_ids.empty() ? 2 : c.eos_token_ids[0]))},
  };

  if (c.is_moe()) {  // Mixtral, as llama.cpp writes it: the llama architecture with experts
    meta.push_back(
        {"llama.expert_count", GgufValue::u32(static_cast<uint32_t>(c.num_local_experts))});
    meta.push_back(
        {"llama.expert_used_count", GgufValue::u32(static_cast<uint32_t>(c.num_experts_per_tok))});
  }

  // The vocabulary, when the model has a sentencepiece tokenizer.model (a tokenizer.json-only
  // model gets none yet).
  {
    namespace fs = std::filesystem;
    const fs::path p(o.model);
    const fs::path spm = (fs::is_directory(p) ? p : p.parent_path()) / "tokenizer.model";
    std::error_code ec;
    if (fs::is_regular_file(spm, ec))
      for (auto& kv : gguf_tokenizer_metadata(spm.string())) meta.push_back(std::move(kv));
  }

  std::vector<LlamaTensor> table = llama_tensors(c);
  std::vector<std::pair<std::string, Tensor>> out;
  int64_t kept_f32 = 0, as_q8_0 = 0;
  uint64_t bytes = 0;
  std::map<DType, int64_t> per_type;  // matrices stored per block type
  // Mixtral's expert matrices are stacked per layer and kind into llama.cpp's [E, rows, cols]
  // tensors: the experts of one (layer, kind) gathered here until the last one is read.
  std::map<std::string, std::vector<Tensor>> stacks;
  for (const LlamaTensor& t : table) {
    Tensor w = source->read(t.name, DType::F32);
    if (t.expert >= 0) {
      const std::string gg = gguf_expert_name_of(t.name, nullptr);
      if (gg.empty()) fail("quantize", o.model, ": no GGUF name for expert tensor ", t.name);
      std::vector<Tensor>& parts = stacks[gg];
      parts.push_back(std::move(w));
      if (static_cast<int64_t>(parts.size()) < c.num_local_experts) continue;
      const int64_t rows = parts[0].dim(0), cols = parts[0].dim(1);
      Tensor all = Tensor::empty(DType::F32, {c.num_local_experts, rows, cols});
      for (size_t e = 0; e < parts.size(); ++e)
        std::memcpy(all.data<float>() + e * rows * cols, parts[e].data<float>(),
                    rows * cols * sizeof(float));
      stacks.erase(gg);
      const DType want = stored_type(type_of(t), cols, as_q8_0, kept_f32);
      ++per_type[want];
      Tensor stored = want == DType::F32 ? all : is_block(want) ? quantize_rows(all, want)
                                                                : all.to(want);
      bytes += stored.nbytes();
      out.emplace_back(gg, std::move(stored));
      continue;
    }
    const bool q = t.name.find("q_proj") != std::string::npos;
    const bool k = t.name.find("k_proj") != std::string::npos;
    if ((q || k) && !c.rope_interleaved)
      w = permute_rope_rows(w, q ? c.num_attention_heads : c.num_key_value_heads);
    // Norms stay f32, and the router, as llama.cpp keeps ffn_gate_inp (and the engine keeps
    // routers).
    DType want = DType::F32;
    if (t.matrix && w.ndim() == 2 && t.part != LlamaPart::Router) {
      want = stored_type(type_of(t), w.dim(1), as_q8_0, kept_f32);
      ++per_type[want];
    }
    Tensor stored = want == DType::F32 ? w : is_block(want) ? quantize_rows(w, want) : w.to(want);
    bytes += stored.nbytes();
    out.emplace_back(gguf_name_of(t.name), std::move(stored));
  }
  write_gguf(o.out, meta, out);
  bool has_tokenizer = false;
  for (const auto& kv : meta) has_tokenizer |= kv.first == "tokenizer.ggml.tokens";
  std::string types;
  for (const auto& [t, n] : per_type)
    types += cat(types.empty() ? "" : ", ", n, " ", std::string(dtype_name(t)));
  std::printf(
      "wrote %s: %zu tensors, %s matrices (%s; rows not whole blocks: %lld as q8_0, %lld kept "
      "f32), %.1f MiB, %s, in %.1f s\n",
      o.out.c_str(), out.size(), mix ? o.type.c_str() : std::string(dtype_name(type)).c_str(),
      types.c_str(), static_cast<long long>(as_q8_0), static_cast<long long>(kept_f32),
      static_cast<double>(bytes) / (1 << 20),
      has_tokenizer ? "with the sentencepiece vocabulary" : "no tokenizer", timer.seconds());
  return 0;
}

[[maybe_unused]] const bool registered = register_command(
    {"quantize",
     "Write a model as a LLaMA GGUF (llama.cpp's names), matrices in q8_0, q4_0, q4_k, q5_k, q6_k "
     "or mixed (q4_k_m, q5_k_m)",
     [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       app.add_option("--model", o->model, "Hugging Face directory or llama2.c .bin")->required();
       app.add_option("--type", o->type,
                      "q8_0, q4_0, q4_k, q5_k, q6_k, q4_k_m / q5_k_m (llama.cpp's Q4_K_M / "
                      "Q5_K_M: Q4_K / Q5_K with the LM head and half the attn_v / ffn_down in "
                      "Q6_K), or f32, f16, bf16: unquantized")
           ->required()
           ->check(CLI::IsMember(
               {"q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m", "f32", "f16", "bf16"}));
       app.add_option("--out", o->out, "Output .gguf file")->required();
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
