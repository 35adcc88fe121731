#include "parallm/model/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "test_util.h"

namespace parallm {
namespace {

using nlohmann::json;

using testing::error_of;

json minimal() {
  return json::parse(R"({"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
                         "num_attention_heads": 8, "vocab_size": 512})");
}

// TinyLlama-1.1B's config.json (the fields that matter).
json tinyllama() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "rope_scaling": null, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2})");
}

TEST(ModelConfig, MinimalConfigParsesWithDefaults) {
  ModelConfig c = ModelConfig::from_json(minimal(), "config.json");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_key_value_heads, 8);  // absent: one KV head per query head
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.q_dim(), 64);
  EXPECT_EQ(c.kv_dim(), 64);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.rope_interleaved);
  EXPECT_TRUE(c.rope_scaling.type.empty());
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_FALSE(c.is_moe());
}

TEST(ModelConfig, MissingFieldNamesTheField) {
  for (const char* field : {"hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "vocab_size"}) {
    json j = minimal();
    j.erase(field);
    EXPECT_EQ(error_of([&] { ModelConfig::from_json(j, "m/config.json"); }),
              std::string("[config] m/config.json: missing required field \"") + field + "\"");
  }
  json j = minimal();
  j["hidden_size"] = "64";
  EXPECT_NE(error_of([&] {
              ModelConfig::from_json(j, "c");
            }).find("field \"hidden_size\" must be an integer, got \"64\""),
            std::string::npos);
}

TEST(ModelConfig, ImpossibleShapesNameTheNumbers) {
  json j = minimal();
  j["num_attention_heads"] = 6;
  EXPECT_NE(error_of([&] {
              ModelConfig::from_json(j, "c");
            }).find("hidden_size 64 is not divisible by num_attention_heads 6"),
            std::string::npos);
  j = minimal();
  j["num_key_value_heads"] = 3;
  EXPECT_NE(error_of([&] {
              ModelConfig::from_json(j, "c");
            }).find("num_attention_heads 8 is not divisible by num_key_value_heads 3"),
            std::string::npos);
  j = minimal();
  j["vocab_size"] = 0;
  EXPECT_NE(error_of([&] {
              ModelConfig::from_json(j, "c");
            }).find("field \"vocab_size\" must be positive, got 0"),
            std::string::npos);
  j = minimal();
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j, "c"); }).find("rope_scaling type \"yarn\""),
            std::string::npos);
}

TEST(ModelConfig, TinyLlamaParamCount) {
  ModelConfig c = ModelConfig::from_json(tinyllama(), "tinyllama");
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.kv_dim(), 256);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.param_count(), 1'100'048'384);
  // Tied, the classifier is counted once.
  c.tie_word_embeddings = true;
  EXPECT_EQ(c.param_count(), 1'100'048'384 - 32000 * 2048);
}

TEST(ModelConfig, JsonRoundTrip) {
  json j = tinyllama();
  j["eos_token_id"] = {2, 7};
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  ModelConfig a = ModelConfig::from_json(j, "a");
  ModelConfig b = ModelConfig::from_json(a.to_json(), "b");
  EXPECT_EQ(b.to_json(), a.to_json());
  EXPECT_EQ(b.eos_token_ids, (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(b.rope_scaling.type, "llama3");
  EXPECT_EQ(b.rope_scaling.factor, 8.0);
  EXPECT_EQ(b.num_key_value_heads, 4);
}

TEST(ModelConfig, Llama3RopeScalingFollowsMetasFormula) {
  json j = minimal();
  j["hidden_size"] = 4096;
  j["num_attention_heads"] = 32;  // head_dim 128
  j["rope_theta"] = 500000.0;
  ModelConfig plain = ModelConfig::from_json(j, "plain");
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  ModelConfig scaled = ModelConfig::from_json(j, "scaled");
  const auto base = plain.rope_inv_freq();
  const auto got = scaled.rope_inv_freq();
  ASSERT_EQ(base.size(), 64u);
  ASSERT_EQ(got.size(), 64u);
  // Meta's apply_scaling: wavelengths under 8192/4 kept, over 8192/1 divided by 8, blended between.
  int kept = 0, divided = 0, blended = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    const double f = 1.0 / std::pow(500000.0, 2.0 * static_cast<double>(i) / 128.0);
    EXPECT_NEAR(base[i], f, 1e-6 * f);
    const double wavelen = 2 * M_PI / f;
    double want;
    if (wavelen < 8192.0 / 4.0) {
      want = f;
      ++kept;
    } else if (wavelen > 8192.0 / 1.0) {
      want = f / 8.0;
      ++divided;
    } else {
      const double smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
      want = (1 - smooth) * f / 8.0 + smooth * f;
      ++blended;
    }
    EXPECT_NEAR(got[i], want, 1e-6 * want) << "frequency " << i;
  }
  // All three regimes occur for Llama 3.1 8B, so each branch above was checked.
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
  EXPECT_EQ(got[0], base[0]);                    // the highest frequency is untouched
  EXPECT_NEAR(got[63], base[63] / 8.0f, 1e-12);  // the lowest is slowed by the factor
}

TEST(ModelConfig, FromFileNamesTheFile) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("parallm_cfg_" + std::to_string(::getpid()) + ".json"))
                               .string();
  std::ofstream(path) << "{\"hidden_size\": 64,";
  EXPECT_NE(
      error_of([&] { ModelConfig::from_file(path); }).find("[config] " + path + ": invalid JSON"),
      std::string::npos);
  std::ofstream(path) << minimal().dump();
  EXPECT_EQ(ModelConfig::from_file(path).vocab_size, 512);
  std::filesystem::remove(path);
  EXPECT_THROW(ModelConfig::from_file(path), std::runtime_error);
}

}  // namespace
}  // namespace parallm
