#include "parallm/model/tokenizer_hf.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "parallm/core/error.h"
#include "parallm/model/bpe.h"
#include "parallm/model/bpe_split.h"
#include "parallm/core/json_limits.h"
#include "parallm/model/tokenizer_unicode.h"

namespace parallm {
namespace {

using nlohmann::json;

constexpr std::string_view kSpace = "\xE2\x96\x81";  // "▁"
// Ids beyond this are a broken file, not a vocabulary (the largest real ones are ~256k); the
// limit keeps a typo from allocating gigabytes for the id -> piece table.
constexpr int64_t kMaxTokenId = int64_t{1} << 24;

// A whole tokenizer.json (the largest real ones are ~20 MB), only from a regular file, nesting
// bounded before parsing (core/json_limits.h).
std::string read_tokenizer_file(const std::string& file) {
  constexpr uint64_t kMaxTokenizerBytes = uint64_t{1} << 30;
  return read_text_file(file, kMaxTokenizerBytes, "tokenizer");
}

json parse_json_file(const std::string& file) {
  return parse_json_text(read_tokenizer_file(file), "tokenizer", file);
}

// The "type" of a tokenizer.json component; "" when it is not an object with a type.
std::string type_of(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) return "";
  return j["type"].get<std::string>();
}

// A JSON value's text for error messages, cut short.
std::string show(const json& v) {
  std::string s = v.dump();
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool special = false;
};

enum class Flavour { kSentencePiece, kByteLevel };
enum class Prepend { kNever, kAlways, kIfNoSpace, kFirstIfNoSpace };

class HfBpeTokenizer final : public Tokenizer {
 public:
  HfBpeTokenizer(const std::string& file, std::string_view text, const HfSpecialIds* ids);

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string decode_token(int32_t prev, int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_ids_.empty() ? -1 : eos_ids_.front(); }
  std::vector<int32_t> eos_ids() const override { return eos_ids_; }
  std::string id_to_piece(int32_t id) const override {
    return id >= 0 && id < vocab_size() ? pieces_[id] : std::string();
  }
  int32_t piece_to_id(std::string_view piece) const override {
    for (const AddedToken& t : added_) {
      if (t.content == piece) return t.id;
    }
    return bpe_.find(piece);
  }

 private:
  // Parsing, in the order the constructor runs them.
  void parse_model(const json& model);
  void parse_normalizer(const json& normalizer);
  void parse_pre_tokenizer(const json& pre);
  void parse_pre_tokenizer_step(const json& step, const std::string& field);
  void parse_added_tokens(const json& added);
  void build_pieces();
  void find_bos_eos(const json& root);

  // Encoding.
  void encode_segment(std::string_view text, size_t offset, std::vector<int32_t>& out) const;
  // Text of `id` when it does / does not open the text (see decode_token).
  std::string token_text(int32_t id, bool opens_text) const;
  void check_id(int32_t id) const;
  bool is_special(int32_t id) const { return special_[id]; }

  std::string file_;
  Flavour flavour_ = Flavour::kSentencePiece;
  bool flavour_set_ = false;
  BpeModel bpe_;
  // Sentencepiece-style: spaces -> "▁", where a "▁" is put in front, split at "▁".
  bool replace_spaces_ = false;
  Prepend prepend_ = Prepend::kNever;
  bool metaspace_split_ = false;
  // Byte-level.
  ByteLevelMap byte_map_;
  std::optional<SplitRegex> split_;  // compiled once, here
  bool add_prefix_space_ = false;

  std::vector<AddedToken> added_;
  std::vector<std::vector<size_t>> added_by_first_byte_;  // byte -> indices into added_,
                                                          // longest content first
  std::vector<std::string> pieces_;                       // id -> vocabulary entry
  std::vector<char> special_;                             // id -> skipped when decoding
  std::vector<int> added_index_;                          // id -> index into added_ or -1
  int32_t bos_id_ = -1;
  std::vector<int32_t> eos_ids_;
};

HfBpeTokenizer::HfBpeTokenizer(const std::string& file, std::string_view text,
                               const HfSpecialIds* ids)
    : file_(file) {
  const json root = parse_json_text(text, "tokenizer", file);
  if (!root.is_object()) fail("tokenizer", file, ": expected a JSON object, got ", show(root));
  if (!root.contains("model") || !root["model"].is_object()) {
    fail("tokenizer", file, ": no \"model\" object");
  }
  parse_model(root["model"]);
  parse_normalizer(root.value("normalizer", json()));
  parse_pre_tokenizer(root.value("pre_tokenizer", json()));
  if (!flavour_set_) {
    fail("tokenizer", file,
         ": cannot tell how text maps to the BPE alphabet: expected a normalizer that replaces "
         "spaces with \"▁\", a Metaspace pre_tokenizer, or a ByteLevel pre_tokenizer");
  }
  parse_added_tokens(root.value("added_tokens", json::array()));
  build_pieces();
  if (!ids) {
    find_bos_eos(root);
    return;
  }
  auto check = [&](int32_t id, const char* what) {
    if (id < 0 || id >= vocab_size())
      fail("tokenizer", file_, ": ", what, " ", id, " is outside the vocabulary [0, ", vocab_size(),
           ")");
    return id;
  };
  if (ids->bos >= 0) bos_id_ = check(ids->bos, "bos id");
  for (int32_t e : ids->eos)
    if (std::find(eos_ids_.begin(), eos_ids_.end(), check(e, "eos id")) == eos_ids_.end())
      eos_ids_.push_back(e);
}

void HfBpeTokenizer::parse_model(const json& model) {
  std::string type;
  if (model.contains("type")) {
    if (!model["type"].is_string())
      fail("tokenizer", file_, ": model.type is ", show(model["type"]));
    type = model["type"].get<std::string>();
  } else if (model.contains("merges")) {
    type = "BPE";  // files from old versions of tokenizers leave it out
  }
  if (type != "BPE") {
    fail("tokenizer", file_, ": model.type \"", type,
         "\" is not supported (only \"BPE\", sentencepiece-style or byte-level)");
  }
  for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(field) && !model[field].is_null() && model[field] != "") {
      fail("tokenizer", file_, ": model.", field, " = ", show(model[field]), " is not supported");
    }
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    fail("tokenizer", file_, ": model.vocab is missing or not an object");
  }
  TokenMap vocab;
  vocab.reserve(model["vocab"].size());
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= kMaxTokenId) {
      fail("tokenizer", file_, ": model.vocab[\"", token, "\"] = ", show(id),
           " is not a token id in [0, ", kMaxTokenId, ")");
    }
    vocab.emplace(token, static_cast<int32_t>(id.get<int64_t>()));
  }

  std::vector<std::pair<std::string, std::string>> merges;
  const json& m = model.value("merges", json::array());
  if (!m.is_array()) fail("tokenizer", file_, ": model.merges is not an array");
  merges.reserve(m.size());
  for (size_t i = 0; i < m.size(); ++i) {
    const json& e = m[i];
    if (e.is_string()) {
      // "a b": tokens never hold a plain space (it is "▁" or "Ġ" in the vocabulary).
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        fail("tokenizer", file_, ": model.merges[", i, "] = ", show(e),
             " is not two tokens separated by one space");
      }
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    } else {
      fail("tokenizer", file_, ": model.merges[", i, "] = ", show(e),
           " is neither \"a b\" nor [\"a\", \"b\"]");
    }
  }

  BpeOptions options;
  auto flag = [&](const char* field) {
    if (!model.contains(field) || model[field].is_null()) return false;
    if (!model[field].is_boolean()) {
      fail("tokenizer", file_, ": model.", field, " = ", show(model[field]), " is not a boolean");
    }
    return model[field].get<bool>();
  };
  options.byte_fallback = flag("byte_fallback");
  options.fuse_unk = flag("fuse_unk");
  options.ignore_merges = flag("ignore_merges");
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    const json& unk = model["unk_token"];
    auto it = unk.is_string() ? vocab.find(unk.get<std::string>()) : vocab.end();
    if (it == vocab.end()) {
      fail("tokenizer", file_, ": model.unk_token ", show(unk), " is not in model.vocab");
    }
    options.unk_id = it->second;
  }
  bpe_ = BpeModel(std::move(vocab), merges, options, file_);
}

void HfBpeTokenizer::parse_normalizer(const json& normalizer) {
  if (normalizer.is_null()) return;
  std::vector<json> steps;
  if (type_of(normalizer) == "Sequence") {
    for (const json& n : normalizer.value("normalizers", json::array())) steps.push_back(n);
  } else {
    steps.push_back(normalizer);
  }
  for (const json& n : steps) {
    const std::string type = type_of(n);
    if (type == "Prepend" && n.value("prepend", "") == kSpace) {
      prepend_ = Prepend::kAlways;
    } else if (type == "Replace" && n.contains("pattern") &&
               n["pattern"].value("String", "") == " " && n.value("content", "") == kSpace) {
      replace_spaces_ = true;
    } else {
      fail("tokenizer", file_, ": normalizer ", show(n),
           " is not supported (only Prepend \"▁\" and Replace \" \" -> \"▁\")");
    }
    flavour_ = Flavour::kSentencePiece;
    flavour_set_ = true;
  }
}

void HfBpeTokenizer::parse_pre_tokenizer(const json& pre) {
  if (pre.is_null()) return;
  if (type_of(pre) == "Sequence") {
    const json& steps = pre.value("pretokenizers", json::array());
    for (size_t i = 0; i < steps.size(); ++i) {
      parse_pre_tokenizer_step(steps[i], cat("pre_tokenizer.pretokenizers[", i, "]"));
    }
  } else {
    parse_pre_tokenizer_step(pre, "pre_tokenizer");
  }
}

void HfBpeTokenizer::parse_pre_tokenizer_step(const json& step, const std::string& field) {
  const std::string type = type_of(step);
  auto set_flavour = [&](Flavour f) {
    if (flavour_set_ && flavour_ != f) {
      fail("tokenizer", file_, ": ", field, " ", type,
           " mixes sentencepiece-style and byte-level BPE");
    }
    flavour_ = f;
    flavour_set_ = true;
  };
  if (type == "Metaspace") {
    set_flavour(Flavour::kSentencePiece);
    if (step.value("replacement", std::string(kSpace)) != kSpace) {
      fail("tokenizer", file_, ": ", field, ".replacement ", show(step["replacement"]),
           " is not supported (only \"▁\")");
    }
    replace_spaces_ = true;
    metaspace_split_ = step.value("split", true);
    if (step.contains("prepend_scheme")) {
      const std::string scheme = step["prepend_scheme"].get<std::string>();
      if (scheme == "always") {
        prepend_ = Prepend::kIfNoSpace;
      } else if (scheme == "first") {
        prepend_ = Prepend::kFirstIfNoSpace;
      } else if (scheme == "never") {
        prepend_ = Prepend::kNever;
      } else {
        fail("tokenizer", file_, ": ", field, ".prepend_scheme \"", scheme, "\" is not known");
      }
    } else {
      prepend_ = step.value("add_prefix_space", true) ? Prepend::kIfNoSpace : Prepend::kNever;
    }
  } else if (type == "ByteLevel") {
    set_flavour(Flavour::kByteLevel);
    add_prefix_space_ = step.value("add_prefix_space", false);
    if (step.value("use_regex", true)) {
      if (split_) fail("tokenizer", file_, ": ", field, " splits the text a second time");
      split_.emplace(kGpt2SplitRegex, false, cat(file_, ": ", field));
    }
  } else if (type == "Split") {
    set_flavour(Flavour::kByteLevel);
    // {"Regex": "..."} or {"String": "..."} (a plain string to cut at).
    const json& pattern = step.value("pattern", json::object());
    const bool literal = pattern.is_object() && pattern.contains("String");
    const char* kind = literal ? "String" : "Regex";
    if (!pattern.is_object() || !pattern.contains(kind) || !pattern[kind].is_string() ||
        pattern[kind] == "") {
      fail("tokenizer", file_, ": ", field, ".pattern ", show(pattern),
           " is neither {\"Regex\": \"...\"} nor {\"String\": \"...\"}");
    }
    if (step.value("behavior", "Isolated") != "Isolated" || step.value("invert", false)) {
      fail("tokenizer", file_, ": ", field, " with behavior ", show(step.value("behavior", json())),
           " invert ", show(step.value("invert", json())),
           " is not supported (only Isolated, not inverted)");
    }
    if (split_) fail("tokenizer", file_, ": ", field, " splits the text a second time");
    split_.emplace(pattern[kind].get<std::string>(), literal, cat(file_, ": ", field, ".pattern"));
  } else {
    fail("tokenizer", file_, ": ", field, " type \"", type,
         "\" is not supported (only Metaspace, ByteLevel and Split)");
  }
}

void HfBpeTokenizer::parse_added_tokens(const json& added) {
  if (!added.is_array()) fail("tokenizer", file_, ": added_tokens is not an array");
  for (size_t i = 0; i < added.size(); ++i) {
    const json& a = added[i];
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"] < 0 ||
        a["id"] >= kMaxTokenId || !a.contains("content") || !a["content"].is_string() ||
        a["content"] == "") {
      fail("tokenizer", file_, ": added_tokens[", i, "] = ", show(a),
           " needs an integer \"id\" in [0, ", kMaxTokenId, ") and a non-empty \"content\"");
    }
    AddedToken t;
    t.id = a["id"].get<int32_t>();
    t.content = a["content"].get<std::string>();
    t.lstrip = a.value("lstrip", false);
    t.rstrip = a.value("rstrip", false);
    t.single_word = a.value("single_word", false);
    t.special = a.value("special", false);
    added_.push_back(std::move(t));
  }
  added_by_first_byte_.assign(256, {});
  for (size_t i = 0; i < added_.size(); ++i) {
    added_by_first_byte_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);
  }
  for (auto& bucket : added_by_first_byte_) {
    std::stable_sort(bucket.begin(), bucket.end(), [&](size_t a, size_t b) {
      return added_[a].content.size() > added_[b].content.size();
    });
  }
}

void HfBpeTokenizer::build_pieces() {
  int32_t size = 0;
  for (const auto& [token, id] : bpe_.vocab()) size = std::max(size, id + 1);
  for (const AddedToken& t : added_) size = std::max(size, t.id + 1);
  pieces_.assign(size, "");
  special_.assign(size, 0);
  added_index_.assign(size, -1);
  for (const auto& [token, id] : bpe_.vocab()) pieces_[id] = token;
  for (size_t i = 0; i < added_.size(); ++i) {
    const AddedToken& t = added_[i];
    pieces_[t.id] = t.content;
    special_[t.id] = t.special;
    added_index_[t.id] = static_cast<int>(i);
  }
}

void HfBpeTokenizer::find_bos_eos(const json& root) {
  const std::filesystem::path dir = std::filesystem::path(file_).parent_path();
  auto read_beside = [&](const char* name) -> json {
    const std::filesystem::path p = dir / name;
    std::error_code ec;
    if (!std::filesystem::is_regular_file(p, ec)) return json::object();
    json j = parse_json_file(p.string());
    if (!j.is_object()) fail("tokenizer", p.string(), ": expected a JSON object, got ", show(j));
    return j;
  };
  auto check = [&](int64_t id, const std::string& where) {
    if (id < 0 || id >= vocab_size()) {
      fail("tokenizer", where, " = ", id, " is outside the vocabulary of ", file_, " [0, ",
           vocab_size(), ")");
    }
    return static_cast<int32_t>(id);
  };
  // A token named in tokenizer_config.json: "<s>" or {"content": "<s>", ...}.
  auto named = [&](const json& v) -> int32_t {
    if (v.is_object()) return piece_to_id(v.value("content", ""));
    if (v.is_string()) return piece_to_id(v.get<std::string>());
    return -1;
  };
  const json config = read_beside("config.json");
  const json tok_config = read_beside("tokenizer_config.json");
  const json gen_config = read_beside("generation_config.json");
  const std::string config_name = (dir / "config.json").string();
  const std::string gen_name = (dir / "generation_config.json").string();

  // BOS: what the post-processor template puts in front of a single sequence.
  std::vector<json> processors;
  const json& post = root.value("post_processor", json());
  if (type_of(post) == "Sequence") {
    for (const json& p : post.value("processors", json::array())) processors.push_back(p);
  } else if (!post.is_null()) {
    processors.push_back(post);
  }
  for (const json& p : processors) {
    if (type_of(p) != "TemplateProcessing" || !p.contains("single")) continue;
    const json& first = p["single"].empty() ? json() : p["single"][0];
    if (!first.contains("SpecialToken")) continue;
    const std::string name = first["SpecialToken"].value("id", "");
    const json& special = p.value("special_tokens", json::object());
    if (special.contains(name) && !special[name].value("ids", json::array()).empty()) {
      bos_id_ = check(special[name]["ids"][0].get<int64_t>(), "post_processor.special_tokens");
    } else {
      bos_id_ = piece_to_id(name);
    }
  }
  if (bos_id_ < 0 && config.contains("bos_token_id") &&
      config["bos_token_id"].is_number_integer()) {
    bos_id_ = check(config["bos_token_id"].get<int64_t>(), config_name + ": bos_token_id");
  }
  if (bos_id_ < 0 && tok_config.contains("bos_token")) bos_id_ = named(tok_config["bos_token"]);
  for (const char* name : {"<s>", "<|begin_of_text|>", "<|startoftext|>"}) {
    if (bos_id_ < 0) bos_id_ = piece_to_id(name);
  }

  // EOS: config.json first, generation_config.json's stop ids after it.
  auto add_eos = [&](const json& v, const std::string& where) {
    std::vector<json> ids;
    if (v.is_array()) {
      ids.assign(v.begin(), v.end());
    } else if (!v.is_null()) {
      ids.push_back(v);
    }
    for (const json& id : ids) {
      if (!id.is_number_integer()) fail("tokenizer", where, " = ", show(v), " is not a token id");
      const int32_t e = check(id.get<int64_t>(), where);
      if (std::find(eos_ids_.begin(), eos_ids_.end(), e) == eos_ids_.end()) eos_ids_.push_back(e);
    }
  };
  add_eos(config.value("eos_token_id", json()), config_name + ": eos_token_id");
  if (eos_ids_.empty() && tok_config.contains("eos_token")) {
    if (int32_t id = named(tok_config["eos_token"]); id >= 0) eos_ids_.push_back(id);
  }
  for (const char* name : {"</s>", "<|end_of_text|>", "<|endoftext|>"}) {
    if (eos_ids_.empty() && piece_to_id(name) >= 0) eos_ids_.push_back(piece_to_id(name));
  }
  add_eos(gen_config.value("eos_token_id", json()), gen_name + ": eos_token_id");
}

std::vector<int32_t> HfBpeTokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && bos_id_ >= 0) out.push_back(bos_id_);

  // Split out added tokens: scan left to right, the longest token that starts at a position wins.
  auto word_char = [&](size_t pos, bool before) {
    // Whether the character just before / at `pos` is a word character (for single_word).
    if (before) {
      if (pos == 0) return false;
      size_t start = pos - 1;
      while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
      char32_t cp;
      unicode::decode_utf8(text, start, &cp);
      return unicode::is_letter(cp) || unicode::is_number(cp) || cp == '_';
    }
    if (pos >= text.size()) return false;
    char32_t cp;
    unicode::decode_utf8(text, pos, &cp);
    return unicode::is_letter(cp) || unicode::is_number(cp) || cp == '_';
  };
  auto space_at = [&](size_t pos, size_t* len) {
    char32_t cp;
    *len = unicode::decode_utf8(text, pos, &cp);
    return unicode::is_whitespace(cp);
  };

  size_t segment_start = 0;  // start of the text not yet encoded
  for (size_t pos = 0; pos < text.size() && !added_.empty();) {
    const AddedToken* hit = nullptr;
    for (size_t index : added_by_first_byte_[static_cast<unsigned char>(text[pos])]) {
      const AddedToken& t = added_[index];
      if (text.compare(pos, t.content.size(), t.content) != 0) continue;
      if (t.single_word && (word_char(pos, true) || word_char(pos + t.content.size(), false))) {
        continue;
      }
      hit = &t;
      break;
    }
    if (!hit) {
      ++pos;
      continue;
    }
    size_t start = pos, end = pos + hit->content.size();
    if (hit->lstrip) {
      // Whitespace just before the token belongs to it.
      while (start > segment_start) {
        size_t back = start - 1;
        while (back > segment_start && (static_cast<unsigned char>(text[back]) & 0xC0) == 0x80) {
          --back;
        }
        size_t len;
        if (!space_at(back, &len)) break;
        start = back;
      }
    }
    if (hit->rstrip) {
      size_t len;
      while (end < text.size() && space_at(end, &len)) end += len;
    }
    encode_segment(text.substr(segment_start, start - segment_start), segment_start, out);
    out.push_back(hit->id);
    segment_start = pos = end;
  }
  encode_segment(text.substr(segment_start), segment_start, out);
  return out;
}

void HfBpeTokenizer::encode_segment(std::string_view text, size_t offset,
                                    std::vector<int32_t>& out) const {
  if (text.empty()) return;
  if (flavour_ == Flavour::kByteLevel) {
    std::string prefixed;
    if (add_prefix_space_ && text[0] != ' ') {
      prefixed = " " + std::string(text);
      text = prefixed;
    }
    if (!split_) {
      bpe_.encode_word(byte_map_.encode(text), out);
      return;
    }
    for (std::string_view word : split_->split(text)) {
      bpe_.encode_word(byte_map_.encode(word), out);
    }
    return;
  }

  // Sentencepiece-style: " " -> "▁", then maybe a "▁" in front.
  std::string s;
  s.reserve(text.size() + 8);
  for (char c : text) {
    if (c == ' ' && replace_spaces_) {
      s += kSpace;
    } else {
      s += c;
    }
  }
  const bool starts_with_space = s.compare(0, kSpace.size(), kSpace) == 0;
  const bool prepend = prepend_ == Prepend::kAlways ||
                       (prepend_ == Prepend::kIfNoSpace && !starts_with_space) ||
                       (prepend_ == Prepend::kFirstIfNoSpace && offset == 0 && !starts_with_space);
  if (prepend) s.insert(0, kSpace);
  if (!metaspace_split_) {
    bpe_.encode_word(s, out);
    return;
  }
  // Metaspace split: every "▁" opens a new word.
  size_t word_start = 0;
  for (size_t pos = kSpace.size(); pos < s.size(); ++pos) {
    if (s.compare(pos, kSpace.size(), kSpace) == 0) {
      bpe_.encode_word(std::string_view(s).substr(word_start, pos - word_start), out);
      word_start = pos;
    }
  }
  bpe_.encode_word(std::string_view(s).substr(word_start), out);
}

void HfBpeTokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    fail("tokenizer", file_, ": token id ", id, " is outside the vocabulary [0, ", vocab_size(),
         ")");
  }
}

std::string HfBpeTokenizer::token_text(int32_t id, bool opens_text) const {
  if (special_[id]) return "";
  const std::string& piece = pieces_[id];
  if (added_index_[id] >= 0) return piece;  // added tokens are plain text
  if (flavour_ == Flavour::kByteLevel) return byte_map_.decode(piece);
  if (int b = bpe_.byte_of(id); b >= 0) return std::string(1, static_cast<char>(b));
  std::string_view p = piece;
  // The "▁" the encoder put in front of the text is not part of it.
  if (opens_text && prepend_ != Prepend::kNever && p.substr(0, kSpace.size()) == kSpace) {
    p.remove_prefix(kSpace.size());
  }
  std::string out;
  out.reserve(p.size());
  for (size_t pos = 0; pos < p.size();) {
    if (p.compare(pos, kSpace.size(), kSpace) == 0) {
      out += ' ';
      pos += kSpace.size();
    } else {
      out += p[pos++];
    }
  }
  return out;
}

std::string HfBpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string bytes;
  // Only the first token that is not special can open the text (and lose its "▁"), as in
  // decode_token where the previous token is -1 or special.
  bool first = true;
  for (int32_t id : ids) {
    check_id(id);
    bytes += token_text(id, first);
    first = first && special_[id];
  }
  return unicode::sanitize_utf8(bytes);
}

std::string HfBpeTokenizer::decode_token(int32_t prev, int32_t id) const {
  check_id(id);
  const bool opens_text = prev < 0 || (prev < vocab_size() && special_[prev]);
  return token_text(id, opens_text);
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& file) {
  return parse_hf_tokenizer(read_tokenizer_file(file), file);
}

std::unique_ptr<Tokenizer> parse_hf_tokenizer(std::string_view text, const std::string& file,
                                              const HfSpecialIds* ids) {
  try {
    return std::make_unique<HfBpeTokenizer>(file, text, ids);
  } catch (const nlohmann::json::exception& e) {
    // A field of the wrong JSON type somewhere we read with value()/get().
    fail("tokenizer", file, ": unexpected content: ", e.what());
  }
}

}  // namespace parallm
