// Issue 17 through the binary: a FIFO or device given as the model, an init-model config too
// large or overflowing, a config value that would give NaN logits. Each ends with a non-zero exit
// (no signal), one line naming the file or field, within seconds; a failed init-model leaves
// nothing behind.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// `timeout` turns a hang into exit 124 instead of a stuck test.
void expect_one_line_error(const std::string& args, const std::string& needle) {
  auto r = testing::run_command("timeout 30 " + std::string(PARALLM_BIN) + " " + args);
  EXPECT_NE(r.exit_code, 0) << args;
  EXPECT_NE(r.exit_code, 124) << "hung: " << args;
  EXPECT_LT(r.exit_code, 124) << "crashed: " << args << "\n" << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << args << "\n" << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << args << "\n" << r.output;
}

json tiny_config(const testing::TempDir& dir) {
  auto init = testing::run_parallm("init-model --shape tiny --out " + dir.file("m"));
  EXPECT_EQ(init.exit_code, 0) << init.output;
  std::ifstream in(dir.file("m/config.json"));
  return json::parse(in);
}

void write_json(const std::string& path, const json& j) {
  std::ofstream(path) << j.dump();
}

TEST(CliHardening, FifoAndDeviceAsTheModel) {
  testing::TempDir dir;
  const std::string fifo = dir.file("model.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_one_line_error("generate --model " + fifo + " --prompt-ids 1", "is a FIFO");
  expect_one_line_error("generate --model /dev/zero --prompt-ids 1",
                        "/dev/zero: is a character device");
}

TEST(CliHardening, InitModelTooLargeLeavesNothing) {
  testing::TempDir dir;
  json c = tiny_config(dir);
  c["num_hidden_layers"] = 1'000'000'000;
  write_json(dir.file("layers.json"), c);
  expect_one_line_error(
      "init-model --shape " + dir.file("layers.json") + " --out " + dir.file("out1/x"),
      "num_hidden_layers 1000000000");
  EXPECT_FALSE(fs::exists(dir.file("out1")));
  c = tiny_config(dir);
  c["hidden_size"] = int64_t{1} << 62;
  c["head_dim"] = int64_t{1} << 62;
  c["num_attention_heads"] = 1;
  c["num_key_value_heads"] = 1;
  write_json(dir.file("huge.json"), c);
  expect_one_line_error(
      "init-model --shape " + dir.file("huge.json") + " --out " + dir.file("out2"),
      "hidden_size 4611686018427387904");
  EXPECT_FALSE(fs::exists(dir.file("out2")));
}

TEST(CliHardening, BadConfigValuesAndHeaderLength) {
  testing::TempDir dir;
  json c = tiny_config(dir);
  c["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 0}};
  write_json(dir.file("m/config.json"), c);
  expect_one_line_error("generate --model " + dir.file("m") + " --prompt-ids 1",
                        "field \"rope_scaling.factor\" must be a finite positive number, got 0");
  c.erase("rope_scaling");
  c["eos_token_id"] = json::array({"a"});
  write_json(dir.file("m/config.json"), c);
  expect_one_line_error("generate --model " + dir.file("m") + " --prompt-ids 1",
                        "field \"eos_token_id[0]\" must be an integer, got \"a\"");
  // The header length a few bytes short: refused, never read shifted.
  c.erase("eos_token_id");
  write_json(dir.file("m/config.json"), c);
  {
    std::fstream f(dir.file("m/model.safetensors"),
                   std::ios::in | std::ios::out | std::ios::binary);
    unsigned char len[8];
    f.read(reinterpret_cast<char*>(len), 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
    n -= 3;  // headers here are far over 3 bytes
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    f.seekp(0);
    f.write(reinterpret_cast<const char*>(len), 8);
  }
  expect_one_line_error("generate --model " + dir.file("m") + " --prompt-ids 1",
                        "model.safetensors");
}

}  // namespace
}  // namespace parallm
