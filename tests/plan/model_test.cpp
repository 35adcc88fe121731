// Presets against published parameter counts; model resolution and bad model input.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "parallm/plan/model_presets.h"

namespace parallm::plan {
namespace {

TEST(ModelPresets, ParameterCountsMatchPublishedFigures) {
  ASSERT_GE(model_presets().size(), 7u);
  for (const ModelPreset& p : model_presets()) {
    SCOPED_TRACE(p.name);
    const double count = double(p.config.param_count());
    // Model cards round to 2 decimals in billions (140.6 B for 8x22B: 1 decimal).
    EXPECT_NEAR(count / 1e9, p.published_params / 1e9, p.published_params >= 100e9 ? 0.06 : 0.006);
    EXPECT_NO_THROW(p.config.validate(p.name));
  }
  // The two the issue names, exactly.
  EXPECT_EQ(resolve_model("llama-3-8b").param_count(), 8030261248);
  EXPECT_EQ(resolve_model("llama-2-70b").param_count(), 68976648192);
  // Mixtral: 46.7 B in all; 12.9 B "active" as Mistral counts them (with the embedding table,
  // which active_params_per_token leaves out: a lookup costs no FLOPs).
  const ModelConfig mix = resolve_model("mixtral-8x7b");
  EXPECT_NEAR(mix.param_count() / 1e9, 46.70, 0.01);
  EXPECT_NEAR((active_params_per_token(mix) + 32000.0 * 4096) / 1e9, 12.9, 0.05);
}

TEST(ModelPresets, ResolvesConfigFilesAndDirectories) {
  const auto dir = std::filesystem::temp_directory_path() / "parallm_plan_model_test";
  std::filesystem::create_directories(dir);
  {
    std::ofstream f(dir / "config.json");
    f << R"({"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512,
             "tie_word_embeddings": true})";
  }
  std::string name;
  const ModelConfig a = resolve_model(dir.string(), &name);
  EXPECT_EQ(a.num_hidden_layers, 5);
  EXPECT_NE(name.find("config.json"), std::string::npos);
  const ModelConfig b = resolve_model((dir / "config.json").string());
  EXPECT_EQ(b.param_count(), a.param_count());
  // 5 x (attention 64*64*2 + 2*64*32 + MLP 3*64*172 + norms 128) + tied embedding 512*64 + 64.
  EXPECT_EQ(a.param_count(), 5 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172 + 128) + 512 * 64 + 64);
  std::filesystem::remove_all(dir);
}

TEST(ModelPresets, BadModelInputIsNamed) {
  try {
    resolve_model("llama-9-1t");
    FAIL();
  } catch (const std::invalid_argument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("llama-9-1t"), std::string::npos) << m;
    EXPECT_NE(m.find("llama-2-70b"), std::string::npos) << m;  // lists the presets
  }
  const auto path = std::filesystem::temp_directory_path() / "parallm_plan_missing.json";
  {
    std::ofstream f(path);
    f << R"({"hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 8, "vocab_size": 512})";
  }
  try {
    resolve_model(path.string());
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("intermediate_size"), std::string::npos) << e.what();
  }
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace parallm::plan
