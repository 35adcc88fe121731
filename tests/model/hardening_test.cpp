// Issue 17: model files given by a careless or hostile user. Each case is refused with one
// std::invalid_argument naming the file and the field (by its path) and value, never a crash, a
// hang, or a silently different model.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "parallm/model/config.h"
#include "parallm/model/init_model.h"
#include "parallm/model/llama2c.h"
#include "parallm/core/json_limits.h"
#include "parallm/model/mmap_file.h"
#include "parallm/model/safetensors.h"
#include "parallm/model/tokenizer.h"
#include "parallm/model/weights.h"
#include "test_util.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::error_of;
using testing::TempDir;

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "expected \"" << (needle) << "\" in: " << (haystack)

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// A safetensors file by hand: the 8-byte length `len` (default: the header's size), then `header`
// and `data`.
void write_st(const std::string& path, const std::string& header, const std::string& data,
              uint64_t len = ~uint64_t{0}) {
  if (len == ~uint64_t{0}) len = header.size();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  write_file(path, bytes + header + data);
}

std::string nested(size_t depth) {
  return std::string(depth, '[') + "1" + std::string(depth, ']');
}

std::string st_error(const std::string& path) {
  return error_of([&] { open_safetensors(path); });
}

// The loaders' JSON goes through core/json_limits.h (its own cases in
// tests/core/checked_json_limits_test.cpp): depth bounded before parsing, short previews.
TEST(Hardening, LoadersRefuseDeepJsonBeforeParsing) {
  EXPECT_NO_THROW(check_json_depth(R"({"a": [1, {"b": "[[[["}]})", 3, "x", "f.json"));
  EXPECT_HAS(error_of([] { parse_json_text(nested(70000), "x", "f.json"); }),
             "f.json: JSON nested deeper than 256 levels");
  EXPECT_EQ(json_preview(json::parse(nested(100))), "an array of 1 element");
}

// A valid one-tensor file: [2, 3] F32 = 24 bytes, header padded with 8 spaces.
const std::string kHeader =
    R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})" + std::string(8, ' ');
const std::string kData(24, '\0');

TEST(Hardening, SafetensorsTensorsMustCoverTheDataSectionExactly) {
  TempDir dir;
  write_st(dir / "ok.safetensors", kHeader, kData);
  EXPECT_EQ(st_error(dir / "ok.safetensors"), "no error");
  // The probe: a header length a few bytes short still parses (padding), so the data section
  // would start early and every tensor read shifted.
  for (uint64_t short_by : {1, 4, 8}) {
    write_st(dir / "short.safetensors", kHeader, kData, kHeader.size() - short_by);
    const std::string e = st_error(dir / "short.safetensors");
    EXPECT_HAS(e, "short.safetensors: the tensors end at byte 24 of the data section but it has " +
                      std::to_string(24 + short_by) + " bytes");
  }
  // Trailing bytes no tensor claims.
  write_st(dir / "tail.safetensors", kHeader, kData + "xx");
  EXPECT_HAS(st_error(dir / "tail.safetensors"), "it has 26 bytes");
  // A gap at the start and between tensors.
  write_st(dir / "gap0.safetensors", R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[4,28]}})",
           std::string(28, '\0'));
  EXPECT_HAS(st_error(dir / "gap0.safetensors"),
             "bytes [0, 4) of the data section belong to no tensor");
  write_st(dir / "gap.safetensors",
           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
           std::string(12, '\0'));
  EXPECT_HAS(st_error(dir / "gap.safetensors"),
             "bytes [4, 8) of the data section belong to no tensor (before \"b\")");
  write_st(dir / "overlap.safetensors",
           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
           std::string(8, '\0'));
  EXPECT_HAS(st_error(dir / "overlap.safetensors"), "overlap");
  // The writer's own files cover exactly.
  write_safetensors(dir / "w.safetensors", {{"x", Tensor::zeros(DType::F32, {3, 5})},
                                            {"e", Tensor::zeros(DType::F32, {0})},
                                            {"y", Tensor::zeros(DType::BF16, {7})}});
  EXPECT_EQ(st_error(dir / "w.safetensors"), "no error");
}

TEST(Hardening, SafetensorsErrorsNameThePathNotTheValue) {
  TempDir dir;
  const std::string deep = nested(70000);
  struct Case {
    std::string header, needle;
  };
  const Case cases[] = {
      {R"({"w":)" + deep + "}", "nested deeper than 256 levels"},
      {R"({"__metadata__":{"a":)" + deep + "}}", "nested deeper than 256 levels"},
      {R"({"w":{"dtype":"F32","shape":[2,)" + deep + R"(],"data_offsets":[0,24]}})",
       "nested deeper than 256 levels"},
      {R"({"w":{"dtype":"F32","shape":[2,[[[3]]]],"data_offsets":[0,24]}})",
       R"(tensors["w"].shape[1] must be a non-negative integer, got an array of 1)"},
      {R"({"w":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,24]}})",
       R"(tensors["w"].shape[1] must be a non-negative integer, got -3)"},
      {R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,{"a":[1]}]}})",
       R"(tensors["w"].data_offsets[1] must be a non-negative integer, got an object of 1)"},
      {R"({"w":[[[1]]]})", R"(tensors["w"] must be an object, got an array of 1)"},
      {R"({"__metadata__":{"a":[[[1]]]}})",
       R"(__metadata__["a"] must be a string, got an array of 1)"},
  };
  for (const Case& c : cases) {
    write_st(dir / "bad.safetensors", c.header, kData);
    const std::string e = st_error(dir / "bad.safetensors");
    EXPECT_HAS(e, c.needle);
    EXPECT_LT(e.size(), 400u) << e.substr(0, 400);
  }
  // The sharded index.
  write_st(dir / "s1.safetensors", kHeader, kData);
  write_file(dir / "model.safetensors.index.json",
             R"({"weight_map":{"w":"s1.safetensors"},"metadata":)" + deep + "}");
  EXPECT_HAS(st_error(dir / "model.safetensors.index.json"), "nested deeper than 256 levels");
  write_file(dir / "model.safetensors.index.json", R"({"weight_map":{"w":[[["s1"]]]}})");
  EXPECT_HAS(st_error(dir / "model.safetensors.index.json"),
             R"(weight_map["w"] must be a file name, got an array of 1)");
}

ModelConfig tiny_with(const std::function<void(json&)>& edit) {
  json j = shape_preset("tiny").to_json();
  edit(j);
  return ModelConfig::from_json(j, "config.json");
}

std::string config_error(const std::function<void(json&)>& edit) {
  return error_of([&] { tiny_with(edit); });
}

TEST(Hardening, ConfigValuesAreRangeChecked) {
  EXPECT_EQ(config_error([](json&) {}), "no error");
  auto llama3 = [](double factor) {
    return [factor](json& j) { j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", factor}}; };
  };
  EXPECT_EQ(config_error(llama3(8.0)), "no error");
  for (double bad : {0.0, -2.0, std::nan(""), std::numeric_limits<double>::infinity()})
    EXPECT_HAS(config_error(llama3(bad)),
               "config.json: field \"rope_scaling.factor\" must be a finite positive number");
  EXPECT_HAS(config_error([](json& j) {
               j["rope_scaling"] = {{"rope_type", "llama3"},
                                    {"factor", 8.0},
                                    {"low_freq_factor", 4.0},
                                    {"high_freq_factor", 4.0}};
             }),
             "rope_scaling.high_freq_factor");
  EXPECT_HAS(
      config_error([](json& j) {
        j["rope_scaling"] = {
            {"rope_type", "llama3"}, {"factor", 8.0}, {"original_max_position_embeddings", "x"}};
      }),
      "field \"rope_scaling.original_max_position_embeddings\" must be an integer, got \"x\"");
  EXPECT_HAS(config_error([](json& j) { j["rope_theta"] = 0; }), "field \"rope_theta\"");
  EXPECT_HAS(config_error([](json& j) { j["rope_theta"] = std::nan(""); }), "field \"rope_theta\"");
  EXPECT_HAS(config_error([](json& j) { j["rms_norm_eps"] = -1e-5; }), "field \"rms_norm_eps\"");
  EXPECT_HAS(config_error([](json& j) {
               j["eos_token_id"] = json::array({2, "a"});
             }),
             "field \"eos_token_id[1]\" must be an integer, got \"a\"");
  EXPECT_HAS(config_error([](json& j) { j["eos_token_id"] = json::array({"a"}); }),
             "field \"eos_token_id[0]\"");
  EXPECT_HAS(config_error([](json& j) { j["eos_token_id"] = 250; }),
             "field \"eos_token_id\" = 250 is not in [0, vocab_size 250)");
  EXPECT_HAS(config_error([](json& j) { j["bos_token_id"] = json::array({1}); }),
             "field \"bos_token_id\" must be an integer, got an array of 1");
  EXPECT_HAS(config_error([](json& j) { j["hidden_size"] = json::parse(nested(300)); }),
             "field \"hidden_size\" must be an integer, got an array of 1");
  EXPECT_HAS(config_error([](json& j) { j["num_hidden_layers"] = 0; }),
             "field \"num_hidden_layers\" must be positive, got 0");
  // Dimensions near 2^62: the parameter count would wrap.
  EXPECT_HAS(config_error([](json& j) {
               j["hidden_size"] = int64_t{1} << 61;
               j["num_attention_heads"] = 1;
               j["num_key_value_heads"] = 1;
               j["head_dim"] = int64_t{1} << 61;
             }),
             "overflows 64 bits");
  EXPECT_HAS(config_error([](json& j) { j["vocab_size"] = uint64_t{1} << 63; }),
             "field \"vocab_size\" is out of range");
}

// Found by fuzz/llama2c_header: a 28-byte llama2.c header asking for 620,756,997 layers of a
// model small enough per layer that the implied file size fits 64 bits had its billions of
// tensors listed (minutes, then out of memory) before the size check could matter; config.json
// likewise. Layers, experts and the tensor count are bounded in ModelConfig::validate.
TEST(Hardening, LayerAndExpertCountsAreBounded) {
  EXPECT_HAS(config_error([](json& j) { j["num_hidden_layers"] = 1'000'000'000; }),
             "num_hidden_layers 1000000000 is more than the 16384 layers");
  EXPECT_HAS(config_error([](json& j) {
               j["num_local_experts"] = 1'000'000;
               j["num_experts_per_tok"] = 2;
             }),
             "num_local_experts 1000000 is more than the 65536 experts");
  EXPECT_HAS(config_error([](json& j) {
               j["num_hidden_layers"] = 16384;
               j["num_local_experts"] = 1024;
               j["num_experts_per_tok"] = 2;
             }),
             "tensors");
  const int32_t raw[7] = {64, 172, 620'756'997, 8, 4, 512, 512};  // the fuzzer's header
  Llama2cHeader h;
  h.dim = raw[0], h.hidden_dim = raw[1], h.n_layers = raw[2], h.n_heads = raw[3];
  h.n_kv_heads = raw[4], h.vocab_size = raw[5], h.seq_len = raw[6];
  const auto start = std::chrono::steady_clock::now();
  const std::string err = error_of([&] {
    llama2c_tensors(reinterpret_cast<const uint8_t*>(raw), llama2c_file_bytes(h), "huge.bin",
                    nullptr);
  });
  EXPECT_HAS(err, "huge.bin: num_hidden_layers 620756997 is more than");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));
}

TEST(Hardening, ConfigFileTooDeepOrNotARegularFile) {
  TempDir dir;
  write_file(dir / "config.json", R"({"hidden_size": )" + nested(70000) + "}");
  EXPECT_HAS(error_of([&] { ModelConfig::from_file(dir / "config.json"); }),
             "config.json: JSON nested deeper than 256 levels");
  EXPECT_HAS(error_of([] { ModelConfig::from_file("/dev/zero"); }),
             "/dev/zero: is a character device, not a regular file");
  EXPECT_HAS(error_of([&] { ModelConfig::from_file(dir.path()); }), "is a directory");
}

TEST(Hardening, FifoAndDevicesAreRefusedWithoutBlocking) {
  TempDir dir;
  const std::string fifo = dir / "model.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_HAS(error_of([&] { MappedFile f(fifo); }), "is a FIFO, not a regular file");
  EXPECT_HAS(error_of([&] { open_model(fifo, nullptr); }), "model.safetensors: is a FIFO");
  EXPECT_HAS(error_of([&] { open_safetensors(fifo); }), "is a FIFO");
  EXPECT_FALSE(looks_like_safetensors(fifo));
  const std::string json_fifo = dir / "tokenizer.json";
  ASSERT_EQ(::mkfifo(json_fifo.c_str(), 0600), 0);
  EXPECT_HAS(error_of([&] { load_tokenizer_file(json_fifo); }), "is a FIFO");
  EXPECT_HAS(error_of([&] { open_model("/dev/zero", nullptr); }), "is a character device");
  EXPECT_HAS(error_of([&] { MappedFile f(dir.path()); }), "is a directory");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

TEST(Hardening, TokenizerJsonTooDeep) {
  TempDir dir;
  write_file(dir / "tokenizer.json", R"({"model": )" + nested(70000) + "}");
  EXPECT_HAS(error_of([&] { load_tokenizer_file(dir / "tokenizer.json"); }),
             "nested deeper than 256 levels");
}

TEST(Hardening, InitModelRefusesHugeModelsAndLeavesNothing) {
  TempDir dir;
  ModelConfig c = shape_preset("tiny");
  c.num_hidden_layers = 1'000'000'000;
  EXPECT_HAS(error_of([&] { check_init_model_size(c, DType::F32); }),
             "over the limit of 1000000000000 (num_hidden_layers 1000000000");
  const std::string out = dir / "a/b/out";
  EXPECT_HAS(error_of([&] { init_random_model(c, out, 0, DType::F32); }), "num_hidden_layers");
  EXPECT_FALSE(fs::exists(dir / "a"));
  // Under the fixed limit but over any test machine's memory: 2e11 f32 parameters = 800 GB.
  c = shape_preset("tiny");
  c.num_hidden_layers = 2000;
  c.hidden_size = 1536;
  c.num_attention_heads = 12;
  c.num_key_value_heads = 6;
  c.head_dim = 128;
  c.intermediate_size = 20000;
  EXPECT_HAS(error_of([&] { check_init_model_size(c, DType::F32); }), "bytes of memory");
  // A working call leaves exactly the two files.
  init_random_model(shape_preset("tiny"), out, 1, DType::F32);
  int n = 0;
  for (const auto& e : fs::directory_iterator(out)) {
    ++n;
    EXPECT_TRUE(e.path().filename() == "config.json" || e.path().filename() == "model.safetensors")
        << e.path();
  }
  EXPECT_EQ(n, 2);
}

}  // namespace
}  // namespace parallm
