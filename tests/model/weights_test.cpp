#include "parallm/model/weights.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/tiny_config.h"
#include "test_util.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;

using testing::error_of;

ModelConfig tiny_config(bool tied) { return testing::tiny_gqa_config(tied); }

Tensor filled(Shape shape, float v) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = v + 0.5f * static_cast<float>(i % 7);
  return t.to(DType::BF16);
}

// Every tensor of `c`, HF names and shapes, with `skip` left out and `override` replacing one.
std::vector<std::pair<std::string, Tensor>> tiny_tensors(const ModelConfig& c,
                                                         const std::string& skip = "",
                                                         const std::string& override_name = "",
                                                         Tensor override_tensor = {}) {
  const int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), f = c.intermediate_size;
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](const std::string& name, Shape shape) {
    if (name == skip) return;
    out.emplace_back(name, name == override_name
                               ? override_tensor
                               : filled(std::move(shape), static_cast<float>(out.size())));
  };
  add(names::kEmbed, {c.vocab_size, h});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    add(names::layer(i, "input_layernorm.weight"), {h});
    add(names::layer(i, "self_attn.q_proj.weight"), {q, h});
    add(names::layer(i, "self_attn.k_proj.weight"), {kv, h});
    add(names::layer(i, "self_attn.v_proj.weight"), {kv, h});
    add(names::layer(i, "self_attn.o_proj.weight"), {h, q});
    add(names::layer(i, "post_attention_layernorm.weight"), {h});
    add(names::layer(i, "mlp.gate_proj.weight"), {f, h});
    add(names::layer(i, "mlp.up_proj.weight"), {f, h});
    add(names::layer(i, "mlp.down_proj.weight"), {h, f});
  }
  add(names::kNorm, {h});
  if (!c.tie_word_embeddings) add(names::kLmHead, {c.vocab_size, h});
  return out;
}

// A Hugging Face model directory: config.json + model.safetensors.
void write_model_dir(const TempDir& dir, const ModelConfig& c,
                     const std::vector<std::pair<std::string, Tensor>>& tensors) {
  std::ofstream(dir / "config.json") << c.to_json().dump(2);
  write_safetensors(dir / "model.safetensors", tensors);
}

TEST(Weights, LayerNames) {
  EXPECT_EQ(names::layer(3, "mlp.up_proj.weight"), "model.layers.3.mlp.up_proj.weight");
  EXPECT_EQ(names::layer(0, "input_layernorm.weight"), "model.layers.0.input_layernorm.weight");
}

TEST(Weights, CheckAcceptsACompleteModelTiedAndUntied) {
  for (bool tied : {true, false}) {
    TempDir dir;
    const ModelConfig c = tiny_config(tied);
    write_model_dir(dir, c, tiny_tensors(c));
    ModelConfig got;
    auto src = open_model(dir.path(), &got);
    EXPECT_EQ(got.hidden_size, 8);
    EXPECT_EQ(got.num_key_value_heads, 1);
    EXPECT_EQ(got.tie_word_embeddings, tied);
    EXPECT_NO_THROW(check_llama_weights(*src, got));
    EXPECT_EQ(src->has(names::kLmHead), !tied);
  }
}

TEST(Weights, CheckNamesTheMissingTensor) {
  TempDir dir;
  const ModelConfig c = tiny_config(true);
  write_model_dir(dir, c, tiny_tensors(c, names::layer(1, "mlp.up_proj.weight")));
  auto src = open_model(dir.path(), nullptr);
  const std::string err = error_of([&] { check_llama_weights(*src, c); });
  EXPECT_NE(err.find("[weights] " + dir.path() +
                     ": missing tensor \"model.layers.1.mlp.up_proj.weight\" (expected [12, 8]"),
            std::string::npos)
      << err;

  // Untied config but no lm_head in the file.
  const ModelConfig untied = tiny_config(false);
  TempDir dir2;
  write_model_dir(dir2, untied, tiny_tensors(untied, names::kLmHead));
  EXPECT_NE(error_of([&] {
              check_llama_weights(*open_model(dir2.path(), nullptr), untied);
            }).find("missing tensor \"lm_head.weight\" (expected [10, 8]"),
            std::string::npos);
}

TEST(Weights, CheckNamesTheWrongShapeAndBothShapes) {
  TempDir dir;
  const ModelConfig c = tiny_config(true);
  // k_proj written for 2 KV heads while config.json says 1.
  write_model_dir(
      dir, c, tiny_tensors(c, "", names::layer(1, "self_attn.k_proj.weight"), filled({8, 8}, 1)));
  auto src = open_model(dir.path(), nullptr);
  const std::string err = error_of([&] { check_llama_weights(*src, c); });
  EXPECT_NE(err.find("tensor \"model.layers.1.self_attn.k_proj.weight\" has shape [8, 8] but the "
                     "config needs [4, 8] (layer 1 of num_hidden_layers 2; num_key_value_heads 1 "
                     "x head_dim 4 = 4, hidden_size 8)"),
            std::string::npos)
      << err;

  TempDir dir2;
  write_model_dir(dir2, c, tiny_tensors(c, "", names::kEmbed, filled({11, 8}, 1)));
  EXPECT_NE(error_of([&] {
              check_llama_weights(*open_model(dir2.path(), nullptr), c);
            }).find("\"model.embed_tokens.weight\" has shape [11, 8] but the config needs [10, 8]"),
            std::string::npos);
}

TEST(Weights, CheckNamesADtypeThatDisagreesWithConfigJson) {
  TempDir dir;
  const ModelConfig c = tiny_config(true);  // torch_dtype bfloat16
  write_model_dir(dir, c,
                  tiny_tensors(c, "", names::layer(0, "mlp.down_proj.weight"),
                               filled({8, 12}, 2).to(DType::F16)));
  ModelConfig got;
  auto src = open_model(dir.path(), &got);
  EXPECT_NE(error_of([&] { check_llama_weights(*src, got); })
                .find("tensor \"model.layers.0.mlp.down_proj.weight\" is f16 but config.json says "
                      "torch_dtype \"bfloat16\""),
            std::string::npos);
}

TEST(Weights, CheckRejectsLayersBeyondTheConfig) {
  TempDir dir;
  ModelConfig three = tiny_config(true);
  three.num_hidden_layers = 3;
  const ModelConfig two = tiny_config(true);
  write_model_dir(dir, two, tiny_tensors(three));
  EXPECT_NE(error_of([&] {
              check_llama_weights(*open_model(dir.path(), nullptr), two);
            }).find("belongs to layer 2 but the config has num_hidden_layers 2"),
            std::string::npos);
}

TEST(Weights, OpenModelFindsTheFormatFromThePath) {
  TempDir dir;
  const ModelConfig c = tiny_config(false);
  const auto tensors = tiny_tensors(c);
  write_model_dir(dir, c, tensors);
  ModelConfig got;
  // The .safetensors file itself, and config.json: both find config.json beside the weights.
  for (const std::string& p : {dir / "model.safetensors", dir / "config.json"}) {
    auto src = open_model(p, &got);
    EXPECT_EQ(got.vocab_size, 10) << p;
    EXPECT_EQ(src->names().size(), tensors.size()) << p;
    Tensor up = src->read(names::layer(1, "mlp.up_proj.weight"), DType::F32, Slice::rows(2, 5));
    Tensor want = tensors[17].second.to(DType::F32).slice_rows(2, 5).contiguous();
    ASSERT_EQ(tensors[17].first, names::layer(1, "mlp.up_proj.weight"));
    EXPECT_EQ(std::memcmp(up.raw(), want.raw(), want.nbytes()), 0);
  }
  // A safetensors file without a telling name is recognised by its first bytes.
  fs::copy_file(dir / "model.safetensors", dir / "weights.data");
  EXPECT_EQ(open_model(dir / "weights.data", &got)->names().size(), tensors.size());

  // Missing pieces, each with its own message.
  EXPECT_NE(
      error_of([&] { open_model(dir / "nothing-here", &got); }).find("no such file or directory"),
      std::string::npos);
  TempDir empty;
  EXPECT_NE(error_of([&] {
              open_model(empty.path(), &got);
            }).find("holds neither model.safetensors nor model.safetensors.index.json"),
            std::string::npos);
  fs::remove(dir / "config.json");
  EXPECT_NE(error_of([&] { open_model(dir.path(), &got); }).find("no config.json beside it"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              open_model(dir / "model.safetensors", &got);
            }).find("model.safetensors: no config.json beside it"),
            std::string::npos);
  // A file that is neither safetensors nor a llama2.c checkpoint of the right size.
  std::ofstream(dir / "junk.txt") << "this is not a model, just some text in a file";
  EXPECT_NE(error_of([&] { open_model(dir / "junk.txt", &got); }).find("junk.txt: "),
            std::string::npos);
}

}  // namespace
}  // namespace parallm
