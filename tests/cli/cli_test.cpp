// The CLI's contract for bad input: one line on stderr naming the flag, file or field and the
// value at fault, a non-zero exit, and no crash. And --help on every command.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "parallm/plan/hardware.h"
#include "test_util.h"

namespace parallm {
namespace {

using testing::run_parallm;

void expect_one_line_error(const std::string& args, const std::string& needle) {
  auto r = run_parallm(args);
  EXPECT_NE(r.exit_code, 0) << args;
  EXPECT_LT(r.exit_code, 128) << "crashed: " << args << "\n" << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << args << "\n" << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << args << "\n" << r.output;
}

TEST(Cli, HelpOnEveryCommand) {
  for (const char* cmd : {"", "generate", "init-model", "bench decode", "bench prefill",
                          "bench comm", "plan", "schedule"}) {
    auto r = run_parallm(std::string(cmd) + " --help");
    EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
    EXPECT_NE(r.output.find("--help"), std::string::npos) << cmd;
  }
}

// Batched decode prints its compute beside the machine's multiply-add peak: both positive, and the
// share in use is the one over the other.
TEST(Cli, BatchedDecodePrintsItsComputeRoofline) {
  auto r = run_parallm("bench decode --model " + testing::stories_model() +
                       " --batch 2 --tokens 2 --warmup 0 --threads 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto number_after = [&](const std::string& label) {
    const size_t at = r.output.find(label);
    EXPECT_NE(at, std::string::npos) << label << "\n" << r.output;
    return at == std::string::npos ? 0.0 : std::stod(r.output.substr(at + label.size()));
  };
  const double gflops = number_after("GFLOP/s (linear)");
  const double peak = number_after("FMA peak");
  const double share = number_after("measured here: ");
  EXPECT_GT(gflops, 0);
  EXPECT_GT(peak, 0);
  // Each printed number is rounded to its last digit (0.005); the ratio of the rounded numbers
  // may be off by that much relative to each, and the share by its own rounding.
  const double rounding = 0.0051 + share * (0.0051 / gflops + 0.0051 / peak);
  EXPECT_NEAR(share, gflops / peak, rounding + 0.001) << r.output;
}

// bench comm's arrival-skew probe: the ranks run the same slice from a barrier, and the JSON's
// "arrival_skew" (the planner's calibration) says how much later than the mean the slowest ends:
// a share of a slice, above 0 (two threads never tie to the nanosecond) and below 1, for slices
// that take time. --skew-rounds 0 leaves it out.
TEST(Cli, BenchCommMeasuresTheArrivalSkewOfItsRanks) {
  const std::string json = ::testing::TempDir() + "/parallm_bench_comm_skew.json";
  const std::string base = "bench comm --ranks 2 --op sendrecv --min-bytes 1K --max-bytes 2K ";
  auto r = run_parallm(base + "--skew-rounds 8 --json " + json);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("# arrival skew (2 ranks, 8 rounds"), std::string::npos) << r.output;
  nlohmann::json j = nlohmann::json::parse(std::ifstream(json));
  ASSERT_TRUE(j.contains("arrival_skew")) << j.dump();
  const auto& sk = j["arrival_skew"];
  EXPECT_EQ(sk["ranks"], 2);
  for (const char* kind : {"stream", "compute"}) {
    EXPECT_GT(sk[kind].get<double>(), 0) << kind;
    EXPECT_LT(sk[kind].get<double>(), 1) << kind;
    EXPECT_GT(sk[std::string(kind) + "_ms"].get<double>(), 0.05) << kind;
  }
  r = run_parallm(base + "--skew-rounds 0 --json " + json);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(nlohmann::json::parse(std::ifstream(json)).contains("arrival_skew"));
  expect_one_line_error(base + "--skew-rounds -1", "--skew-rounds");
  std::remove(json.c_str());
}

// bench comm --load N: each op again while N threads a rank compute beside it; the JSON's
// beside_compute holds their fit and the share of its speed the computing kept (two ranks, each
// with a computing thread and the collectives' thread, share this machine's cores: above 0, at
// most 1).
TEST(Cli, BenchCommLoadTimesTheCollectivesBesideCompute) {
  const std::string json = ::testing::TempDir() + "/parallm_bench_comm_load.json";
  const std::string base =
      "bench comm --ranks 2 --op all_reduce --min-bytes 64K --max-bytes 256K --iters 3 "
      "--skew-rounds 0 ";
  auto r = run_parallm(base + "--load 1 --json " + json);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  int loaded = 0;  // table rows: op, size, count, "loaded", time, ...
  std::istringstream lines(r.output);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream f(line);
    std::string op, size, count, algo;
    if (f >> op >> size >> count >> algo && op == "all_reduce" && algo == "loaded") ++loaded;
  }
  EXPECT_EQ(loaded, 3) << r.output;  // 64K, 128K, 256K
  EXPECT_NE(r.output.find("# beside compute (--load 1"), std::string::npos) << r.output;
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(json));
  ASSERT_TRUE(j.contains("beside_compute")) << j.dump();
  const auto& bc = j["beside_compute"];
  EXPECT_EQ(bc["threads"], 1);
  EXPECT_GT(bc["compute_speed"].get<double>(), 0) << j.dump();
  EXPECT_LE(bc["compute_speed"].get<double>(), 1.0) << j.dump();
  ASSERT_TRUE(bc["ops"].contains("all_reduce")) << j.dump();
  EXPECT_GT(bc["ops"]["all_reduce"]["beta_gbps"].get<double>(), 0) << j.dump();
  // The planner reads it back.
  const auto cal = plan::Calibration::from_file(json);
  EXPECT_EQ(cal.beside_compute.threads, 1);
  r = run_parallm(base + "--json " + json);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(nlohmann::json::parse(std::ifstream(json)).contains("beside_compute"));
  expect_one_line_error(base + "--load -1", "--load");
  std::remove(json.c_str());
}

// bench comm --share-probe G: groups of G ranks, each alone then all at once, a GEMV and an
// all-reduce a round; the JSON's core_sharing names them and an efficiency in (0, 1] that the
// planner reads back. A world that does not split into two or more groups is refused.
TEST(Cli, BenchCommShareProbeTimesGroupsAloneAndAtOnce) {
  const std::string json = ::testing::TempDir() + "/parallm_bench_comm_share.json";
  const std::string base =
      "bench comm --op all_reduce --min-bytes 4K --max-bytes 8K --iters 3 --skew-rounds 0 ";
  auto r = run_parallm(base + "--ranks 4 --share-probe 2 --share-cores 2 --json " + json);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("# core sharing (2 groups of 2 ranks on 2 cores"), std::string::npos)
      << r.output;
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(json));
  ASSERT_TRUE(j.contains("core_sharing")) << j.dump();
  const auto& cs = j["core_sharing"];
  EXPECT_EQ(cs["groups"], 2);
  EXPECT_EQ(cs["group_size"], 2);
  EXPECT_EQ(cs["cores"], 2);
  EXPECT_GT(cs["alone_ms"].get<double>(), 0) << j.dump();
  EXPECT_GT(cs["together_ms"].get<double>(), 0) << j.dump();
  EXPECT_GT(cs["efficiency"].get<double>(), 0) << j.dump();
  EXPECT_LE(cs["efficiency"].get<double>(), 1.0) << j.dump();
  EXPECT_DOUBLE_EQ(plan::Calibration::from_file(json).core_sharing_efficiency,
                   cs["efficiency"].get<double>());
  r = run_parallm(base + "--ranks 2 --json " + json);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(nlohmann::json::parse(std::ifstream(json)).contains("core_sharing"));
  expect_one_line_error(base + "--ranks 4 --share-probe 3", "--share-probe 3");
  expect_one_line_error(base + "--ranks 2 --share-probe 2", "--share-probe 2");
  expect_one_line_error(base + "--ranks 4 --share-probe -1", "--share-probe");
  std::remove(json.c_str());
}

// Prefill through pipeline stages runs the engine's prompt pass (the activations sent stage to
// stage) and times it: the same prompt's FLOPs, a positive time, and the layout named.
TEST(Cli, PrefillRunsThroughPipelineStages) {
  for (const char* layout : {"--tp 2", "--pp 2"}) {
    auto r = run_parallm("bench prefill --model " + testing::stories_model() +
                         " --prompt-len 32 --threads 1 " + layout);
    ASSERT_EQ(r.exit_code, 0) << layout << "\n" << r.output;
    const std::string name = std::string(layout) == "--tp 2" ? "tp 2 x pp 1" : "tp 1 x pp 2";
    EXPECT_NE(r.output.find(name), std::string::npos) << r.output;
    const size_t at = r.output.find("ms/prompt");
    ASSERT_NE(at, std::string::npos) << r.output;
    EXPECT_GT(std::stod(r.output.substr(at + 9)), 0) << r.output;
  }
}

TEST(Cli, BadFlagsAndValues) {
  const std::string m = "--model " + testing::stories_model();
  expect_one_line_error("generate " + m + " --prompt-ids 1 --no-such-flag", "--no-such-flag");
  expect_one_line_error("generate " + m + " --prompt-ids 1,x,3", "\"x\" is not an integer");
  expect_one_line_error("generate " + m + " --prompt-ids 1 --dtype int3", "--dtype");
  expect_one_line_error("generate " + m + " --prompt-ids 999", "token id 999");
  expect_one_line_error("generate " + m + " --prompt-ids 1 --top-p 1.5",
                        "--top-p must be in (0, 1], got 1.5");
  expect_one_line_error("generate " + m, "give exactly one of --prompt");
  expect_one_line_error("generate --model /no/such/model --prompt-ids 1", "/no/such/model");
  expect_one_line_error("init-model --shape huge --out /tmp/x", "unknown --shape \"huge\"");
}

TEST(Cli, BadModelFiles) {
  testing::TempDir dir;
  // A truncated llama2.c checkpoint.
  {
    std::ifstream in(testing::stories_model(), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream out(dir.file("cut.bin"), std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  expect_one_line_error("generate --model " + dir.file("cut.bin") + " --prompt-ids 1", "cut.bin");
  // A config.json with heads that do not divide the hidden size.
  auto init = run_parallm("init-model --shape tiny --out " + dir.file("m"));
  ASSERT_EQ(init.exit_code, 0) << init.output;
  {
    std::ifstream in(dir.file("m/config.json"));
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string from = "\"num_attention_heads\": 12";
    ASSERT_NE(text.find(from), std::string::npos);
    text.replace(text.find(from), from.size(), "\"num_attention_heads\": 7");
    std::ofstream out(dir.file("m/config.json"));
    out << text;
  }
  expect_one_line_error("generate --model " + dir.file("m") + " --prompt-ids 1",
                        "num_attention_heads");
}

}  // namespace
}  // namespace parallm
