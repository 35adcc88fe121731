// The tokenizer.json that Hugging Face writes for a LLaMA (sentencepiece BPE) model: "▁" for spaces
// (prepended, then replacing " "), <s> (id 1) before each sequence, byte-fallback tokens, and the
// decoder that undoes it all. Tests give the vocabulary, the merges and the added (special) tokens.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace parallm::testing {

inline const std::string kSpmSpace = "\xE2\x96\x81";  // ▁

// One entry of "added_tokens": a special token, matched as it stands.
inline nlohmann::json special_added_token(int32_t id, const std::string& content) {
  return {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", true}};
}

inline nlohmann::json llama_style_tokenizer_json(nlohmann::json added_tokens, nlohmann::json vocab,
                                                 nlohmann::json merges) {
  using nlohmann::json;
  const std::string& meta = kSpmSpace;
  json j;
  j["version"] = "1.0";
  j["added_tokens"] = std::move(added_tokens);
  j["normalizer"] = {{"type", "Sequence"},
                     {"normalizers",
                      {{{"type", "Prepend"}, {"prepend", meta}},
                       {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", meta}}}}};
  j["pre_tokenizer"] = nullptr;
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens",
       {{"<s>", {{"id", "<s>"}, {"ids", json::array({1})}, {"tokens", json::array({"<s>"})}}}}}};
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "Replace"}, {"pattern", {{"String", meta}}}, {"content", " "}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}},
                    {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", "<unk>"},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", true},
                {"byte_fallback", true},
                {"vocab", std::move(vocab)},
                {"merges", std::move(merges)}};
  return j;
}

}  // namespace parallm::testing
