// Issue 17, planner and schedule inputs: every hostile or careless input ends with a non-zero exit
// (no signal), one line on stderr naming the flag, field or file and its value, within seconds.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace {

using parallm::testing::TempDir;

struct Outcome {
  bool exited = false;  // false: killed by a signal
  int code = -1;
  std::string err;
  double seconds = 0;
};

Outcome run_parallm(const std::string& args, const TempDir& dir) {
  const std::string err_path = dir.file("stderr.txt");
  const std::string cmd = std::string(PARALLM_BIN) + " " + args + " >/dev/null 2>" + err_path;
  const auto t0 = std::chrono::steady_clock::now();
  const int status = std::system(cmd.c_str());
  Outcome o;
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // system() runs the command under sh: a signal shows as sh's exit status 128 + signal.
  o.exited = WIFEXITED(status) && WEXITSTATUS(status) < 128;
  o.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_path);
  o.err.assign(std::istreambuf_iterator<char>(e), {});
  return o;
}

void write(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

struct Case {
  std::string args;
  std::vector<std::string> expect;  // substrings of the one stderr line
};

void expect_refused(const std::vector<Case>& cases, const TempDir& dir) {
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const Outcome o = run_parallm(c.args, dir);
    EXPECT_TRUE(o.exited) << "killed by a signal; stderr: " << o.err.substr(0, 300);
    EXPECT_NE(o.code, 0);
    EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err.substr(0, 600);
    EXPECT_LT(o.err.size(), 600u) << o.err.substr(0, 600);
    for (const std::string& s : c.expect)
      EXPECT_NE(o.err.find(s), std::string::npos) << "missing \"" << s << "\" in " << o.err;
    EXPECT_LT(o.seconds, 30.0);
  }
}

TEST(PlanHardening, CountFlagsGivenAreChecked) {
  TempDir dir;
  const std::string m = "plan --model llama-2-7b ";
  expect_refused(
      {
          // The divisor loop overflowed at INT_MAX (SIGFPE); now the count is bounded first.
          {m + "--gpus 2147483647", {"--gpus", "2147483647"}},
          {m + "--gpus 99999999999", {"--gpus", "99999999999"}},
          // 0 used to plan as if the flag were absent.
          {m + "--gpus 0", {"--gpus", "got 0"}},
          {m + "--nodes 0", {"--nodes", "got 0"}},
          {m + "--gpus-per-node 0", {"--gpus-per-node", "got 0"}},
          {m + "--gpus-per-node 5000", {"--gpus-per-node", "5000"}},
          {m + "--tp 0", {"--tp", "got 0"}},
          {m + "--pp -1", {"--pp", "got -1"}},
          {m + "--gpu ''", {"--gpu", "empty"}},
          {m + "--topology ''", {"--topology", "empty"}},
          {m + "--batch 0", {"--batch", "got 0"}},
          {m + "--prompt-len 99999999999", {"--prompt-len", "99999999999"}},
          {m + "--top 0", {"--top", "got 0"}},
          // A long name is cut in the message.
          {m + "--gpu " + std::string(100000, 'x'), {"--gpu", "(100000 bytes)"}},
          {m + "--gpus 2 --link " + std::string(100000, 'y'), {"--link", "yyy..."}},
          // One node cannot hold a million devices: the user is told to give --nodes.
          {m + "--gpus 1000000", {"--gpus 1000000", "--nodes"}},
      },
      dir);
}

TEST(PlanHardening, NonFiniteRatesAreRefused) {
  TempDir dir;
  const std::string m = "plan --model llama-2-7b --gpu cpu --gpus 2 ";
  expect_refused(
      {
          {m + "--mem-bw nan", {"--mem-bw", "nan"}},
          {m + "--mem-bw inf", {"--mem-bw", "inf"}},
          {m + "--mem-bw 0", {"--mem-bw", "got 0"}},
          {m + "--mem-bw 20 --flops nan", {"--flops", "nan"}},
          {m + "--mem-bw 20 --flops -inf", {"--flops", "-inf"}},
          {m + "--mem-bw 20 --rank-mem-bw inf", {"--rank-mem-bw", "inf"}},
      },
      dir);
}

TEST(PlanHardening, TopologyIsBounded) {
  TempDir dir;
  // A 26 KB token (std::regex recursed on it: SIGSEGV), in the header and in a cell.
  write(dir / "long_header.txt", "GPU0 GPU" + std::string(26000, '1') + "\nGPU0 X\n");
  write(dir / "long_cell.txt", "GPU0 GPU1\nGPU0 X NV" + std::string(26000, '1') + "\nGPU1 NV1 X\n");
  // 60000 columns used to allocate 60000^2 x 8 bytes.
  std::string wide;
  for (int i = 0; i < 60000; ++i) wide += "GPU" + std::to_string(i) + " ";
  write(dir / "wide.txt", wide + "\n");
  // Larger than any capture: refused before it is read.
  write(dir / "huge.txt", std::string(17 << 20, ' '));
  expect_refused(
      {
          {"plan --model llama-2-7b --topology " + dir / "long_header.txt",
           {"long_header.txt:1", "26003 bytes", "at most 64"}},
          {"plan --model llama-2-7b --topology " + dir / "long_cell.txt",
           {"long_cell.txt:2", "26002 bytes"}},
          {"plan --model llama-2-7b --topology " + dir / "wide.txt",
           {"wide.txt:1", "60000 devices", "1024"}},
          {"plan --model llama-2-7b --topology " + dir / "huge.txt", {"huge.txt", "larger than"}},
          {"plan --model llama-2-7b --topology /dev/zero", {"/dev/zero", "not a regular file"}},
      },
      dir);
}

TEST(PlanHardening, HardwareJsonErrorsNameThePath) {
  TempDir dir;
  const std::string deep = std::string(65000, '[') + std::string(65000, ']');
  write(dir / "deep.json", R"({"gpu": {"name": "x", "peak_tflops": )" + deep + "}}");
  write(dir / "array.json",
        R"({"gpu": {"name": "x", "peak_tflops": [[1, 2], 3], "mem_bw_gbps": 1, "memory_gb": 1}})");
  write(dir / "inf.json",
        R"({"gpu": {"name": "x", "peak_tflops": 1e999, "mem_bw_gbps": 1, "memory_gb": 1}})");
  write(dir / "name.json",
        R"({"gpu": {"name": {"a": 1}, "peak_tflops": 1, "mem_bw_gbps": 1, "memory_gb": 1}})");
  write(dir / "nodes.json", R"({"nodes": 4294967297})");
  write(dir / "link.json",
        R"({"intra_node": {"bandwidth_gbps": "fast", "latency_us": 1}})");
  const std::string long_string(100000, 'x');
  write(dir / "long.json", R"({"gpu": {"name": "x", "peak_tflops": ")" + long_string +
                               R"(", "mem_bw_gbps": 1, "memory_gb": 1}})");
  const std::string m = "plan --model llama-2-7b --hardware ";
  expect_refused(
      {
          {m + dir / "deep.json", {"deep.json", "nested deeper than 256"}},
          {m + dir / "array.json", {"gpu.peak_tflops", "an array of 2 elements"}},
          {m + dir / "inf.json", {"inf.json", "1e999"}},
          {m + dir / "name.json", {"gpu.name", "an object of 1 field"}},
          {m + dir / "nodes.json", {"nodes", "4294967297"}},
          {m + dir / "link.json", {"intra_node.bandwidth_gbps", "\"fast\""}},
          {m + dir / "long.json", {"gpu.peak_tflops", "(100000 bytes)"}},
      },
      dir);
}

TEST(PlanHardening, ConfigShapesThatOverflowAreRefused) {
  TempDir dir;
  // 2^62 printed "4611686018.43 B parameters" (the count wrapped).
  write(dir / "config.json",
        R"({"hidden_size": 4611686018427387904, "intermediate_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 4})");
  write(dir / "vocab.json",
        R"({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 4611686018427387904})");
  expect_refused(
      {
          {"plan --model " + dir / "config.json", {"config.json", "hidden_size", "64 bits"}},
          {"plan --model " + dir / "vocab.json", {"vocab.json", "vocab_size", "64 bits"}},
      },
      dir);
}

TEST(PlanHardening, LargeValidClusterStillPlans) {
  // The bounds are not a regression: a million devices over 1024 nodes plans (quickly: divisors by
  // trial to sqrt), and its layouts multiply to the world.
  TempDir dir;
  const Outcome o = run_parallm(
      "plan --model llama-2-7b --gpus 1048576 --nodes 1024 --tp 8 --pp 4 --top 1", dir);
  EXPECT_TRUE(o.exited);
  EXPECT_EQ(o.code, 0) << o.err;
  EXPECT_LT(o.seconds, 30.0);
}

}  // namespace
