#include "parallm/model/tokenizer.h"

#include <filesystem>

#include "parallm/core/error.h"
#include "parallm/model/gguf.h"
#include "parallm/model/tokenizer_hf.h"
#include "parallm/model/tokenizer_spm.h"
#include "parallm/model/tokenizer_unicode.h"

namespace parallm {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path dir = model_path;
  // A GGUF carries its own vocabulary (tokenizer.ggml.*); without one, look beside the file.
  if (dir.extension() == ".gguf" && fs::is_regular_file(dir, ec)) {
    const GgufFile g = open_gguf(model_path);
    if (auto tok = gguf_tokenizer(g.header, model_path)) return tok;
  }
  if (!fs::is_directory(dir, ec)) dir = dir.parent_path();
  if (dir.empty()) dir = ".";
  // tokenizer.json first: it is what transformers uses, and it knows the chat special tokens.
  for (const char* name : {"tokenizer.json", "tokenizer.model"}) {
    const fs::path p = dir / name;
    if (fs::is_regular_file(p, ec)) return load_tokenizer_file(p.string());
  }
  return nullptr;
}

std::unique_ptr<Tokenizer> load_tokenizer_file(const std::string& file) {
  const std::string ext = std::filesystem::path(file).extension().string();
  if (ext == ".model") return load_sentencepiece_tokenizer(file);
  if (ext == ".json") return load_hf_tokenizer(file);
  fail("tokenizer", file, ": unknown tokenizer file type \"", ext,
       "\" (expected a sentencepiece .model or a Hugging Face tokenizer .json)");
}

std::string TokenStreamer::push(int32_t id) {
  pending_ += tokenizer_->decode_token(prev_, id);
  prev_ = id;
  // Hold back the bytes of a character that later tokens may still complete.
  const size_t done = unicode::complete_utf8_prefix(pending_);
  std::string out = unicode::sanitize_utf8(std::string_view(pending_).substr(0, done));
  pending_.erase(0, done);
  return out;
}

std::string TokenStreamer::finish() {
  std::string out = unicode::sanitize_utf8(pending_);
  pending_.clear();
  prev_ = -1;
  return out;
}

}  // namespace parallm
