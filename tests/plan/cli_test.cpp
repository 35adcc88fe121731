// `parallm plan` end to end: the seed scenario's table and JSON, calibration, topology, and bad
// input turned into one clear line on stderr with a non-zero exit.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace {

struct CmdResult {
  int code;
  std::string out;
  std::string err;
};

CmdResult run_cli(const std::string& args) {
  const auto err_path =
      std::filesystem::temp_directory_path() / ("parallm_plan_cli_" + std::to_string(::getpid()));
  const std::string cmd = std::string(PARALLM_BIN) + " " + args + " 2>" + err_path.string();
  CmdResult r{0, "", ""};
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, "", "popen failed"};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_path);
  r.err.assign(std::istreambuf_iterator<char>(e), {});
  std::filesystem::remove(err_path);
  return r;
}

const std::string kFixtures = std::string(PARALLM_SOURCE_DIR) + "/tests/fixtures/nvidia-smi-topo/";

TEST(PlanCli, SeedScenarioTable) {
  const CmdResult r =
      run_cli("plan --model llama-2-70b --gpu a100-80g --gpus 4 --link nvlink --batch 8");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("68.98 B parameters"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("best: tp=4 pp=1 dp=1 ep=1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("why the others lost"), std::string::npos);
  EXPECT_NE(r.out.find("does not fit"), std::string::npos);
}

TEST(PlanCli, JsonHasTheDocumentedFields) {
  const CmdResult r =
      run_cli("plan --model llama-2-70b --gpu a100-80g --gpus 4 --link pcie4 --batch 1 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["params"].get<int64_t>(), 68976648192);
  ASSERT_GE(j["layouts"].size(), 3u);
  for (const auto& l : j["layouts"]) {
    for (const char* key :
         {"tp", "pp", "dp", "ep", "fits", "weights_bytes_per_device", "kv_cache_bytes_per_device",
          "comm_bytes_per_token", "ttft_ms", "tpot_ms", "tokens_per_s", "reasons"})
      EXPECT_TRUE(l.contains(key)) << key;
  }
  EXPECT_EQ(j["layouts"][0]["tp"], 4);
  // The TP-over-PCIe reason names the latency.
  bool reason = false;
  for (const auto& s : j["layouts"][0]["reasons"])
    reason |= s.get<std::string>().find("TP over pcie4") != std::string::npos;
  EXPECT_TRUE(reason) << j["layouts"][0]["reasons"].dump();
}

TEST(PlanCli, CpuWithCalibrationAndConfigFile) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("parallm_plan_cli_cpu_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json")
      << R"({"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
      "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512, "tie_word_embeddings": true})";
  std::ofstream(dir / "comm.json") << R"({"backend": "mpi", "world": 2, "ops": {
      "all_reduce": {"alpha_us": 10, "beta_gbps": 4}, "sendrecv": {"alpha_us": 3, "beta_gbps": 6}}})";
  const CmdResult r =
      run_cli("plan --model " + dir.string() + "/config.json --gpu cpu --gpus 2 --calibrate " +
              dir.string() + "/comm.json --mem-bw 30 --rank-mem-bw 20 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  // The node's 30 GB/s shared by both ranks; one rank alone at most 20.
  EXPECT_DOUBLE_EQ(j["hardware"]["rank_mem_bw"].get<double>(), 15e9);
  EXPECT_DOUBLE_EQ(j["hardware"]["rank_mem_bw_alone"].get<double>(), 20e9);
  EXPECT_EQ(j["hardware"]["shared_cores"], 0);  // every rank its own cores unless told
  EXPECT_EQ(j["hardware"]["reread_gbps"], 0);   // the GEMV's further passes free unless measured
  bool tp2 = false, pp2 = false;
  for (const auto& l : j["layouts"]) {
    if (l["tp"] == 2) {
      tp2 = true;
      // 11 all-reduces (2 per layer + embedding) of at least alpha each: comm dominates this tiny
      // model.
      EXPECT_GT(l["tpot_ms"].get<double>(), 11 * 0.010);
    }
    if (l["pp"] == 2) pp2 = true;
  }
  EXPECT_TRUE(tp2 && pp2);
  EXPECT_EQ(j["hardware"]["calibration"]["backend"], "mpi");
  std::filesystem::remove_all(dir);
}

TEST(PlanCli, TopologyConstrainsTp) {
  const CmdResult r = run_cli("plan --model llama-3-70b --gpu h100-sxm --topology " + kFixtures +
                              "h100-8gpu-nvlink.txt --batch 4 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["hardware"]["devices"], 8);
  EXPECT_EQ(j["hardware"]["largest_nvlink_island"], 8);
  const CmdResult p = run_cli("plan --model llama-3-70b --gpu rtx4090 --topology " + kFixtures +
                              "rtx4090-8gpu-pcie-nics.txt --dtype int4 --batch 4");
  ASSERT_EQ(p.code, 0) << p.err;
  EXPECT_NE(p.out.find("pcie4"), std::string::npos) << p.out;
}

TEST(PlanCli, TrainingMode) {
  const CmdResult r = run_cli(
      "plan --model llama-2-7b --gpu h100-sxm --gpus 8 --train --global-batch 64 --seq-len 4096");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("MFU"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("per step"), std::string::npos) << r.out;
}

// parallm's own shapes on CPU ranks: the kernels' rates measured (or --flops), the per-stage
// activations printed and in the JSON, equal to the documented formula.
TEST(PlanCli, TrainingOnCpuRanksPrintsStageActivations) {
  const CmdResult r = run_cli(
      "plan --model tiny --gpu cpu --gpus 2 --mem-bw 20 --train --global-batch 4 --micro-batch 1 "
      "--seq-len 32 --pp 2 --schedule gpipe --recompute none --threads 1");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("kernels  measured here per rank"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("stage 1: F "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("micro-batches in flight"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("fp32"), std::string::npos) << r.out;
  const CmdResult j = run_cli(
      "plan --model tiny --gpu cpu --gpus 2 --mem-bw 20 --flops 10 --train --global-batch 4 "
      "--micro-batch 1 --seq-len 32 --pp 2 --schedule gpipe --recompute none --json");
  ASSERT_EQ(j.code, 0) << j.err;
  const auto js = nlohmann::json::parse(j.out);
  EXPECT_FALSE(js["hardware"].contains("training_kernels_gflops"));
  ASSERT_EQ(js["layouts"].size(), 1u);
  const auto& st = js["layouts"][0]["stages"];
  ASSERT_EQ(st.size(), 2u);
  // tiny: hidden 96, 12 heads of 8 over 6 KV heads, FFN 200, vocabulary 250, 3 layers: stage 0
  // has 2 layers, stage 1 one and the head (partition_layers: the leftover to the first of the
  // two middle stages). A layer of 32 tokens: 32 x (4 x 96 + 2 + 2 x 96 + 2 x 48 + 3 x 200) + 12 x
  // 32^2 = 32 x 1274 + 12288 = 53056 values; the head 32 x (2 x 96 + 1 + 250) = 14176.
  EXPECT_EQ(st[0]["activation_bytes_per_micro_batch"].get<double>(), 2 * 53056.0 * 4);
  EXPECT_EQ(st[1]["activation_bytes_per_micro_batch"].get<double>(), (53056.0 + 14176) * 4);
  // GPipe holds all 4 micro-batches on both stages.
  EXPECT_EQ(st[0]["peak_states"].get<int>(), 4);
  EXPECT_EQ(st[1]["activation_peak_bytes"].get<double>(), 4 * (53056.0 + 14176) * 4);
  // Each stage's own times (stage 1: one layer and the head, stage 0: two layers); W is part of B.
  EXPECT_GT(st[1]["forward_ms"].get<double>(), st[0]["forward_ms"].get<double>() / 2);
  EXPECT_GT(st[0]["backward_ms"].get<double>(), st[0]["weight_ms"].get<double>());
}

TEST(PlanCli, BadInputIsOneClearLine) {
  struct Case {
    std::string args, expect;
  };
  const auto bad_topo =
      std::filesystem::temp_directory_path() / ("parallm_bad_topo_" + std::to_string(::getpid()));
  std::ofstream(bad_topo) << "\tGPU0\tGPU1\nGPU0\t X \tNV?\nGPU1\tNV4\t X\n";
  const std::vector<Case> cases = {
      {"plan --model llama-9-1t --gpus 4", "llama-9-1t"},
      {"plan --model llama-2-70b --gpu a100-80g --gpus 3 --tp 3",
       "TP=3 does not divide the 64 attention heads"},
      {"plan --model llama-2-70b --gpu b300 --gpus 4", "unknown device \"b300\""},
      {"plan --model llama-2-70b --gpus 4 --link warp", "--link"},
      {"plan --model llama-2-70b --gpus 4 --dtype fp12", "--dtype"},
      {"plan --model llama-2-70b --gpus 4 --goal cheapest", "--goal"},
      {"plan --model llama-2-70b --gpus 4 --calibrate /nonexistent/comm.json",
       "/nonexistent/comm.json"},
      {"plan --model llama-2-70b --topology " + bad_topo.string(), "NV?"},
      {"plan --model /nonexistent/config.json --gpus 4", "/nonexistent/config.json"},
      {"plan --model llama-2-7b --gpu a100-80g --gpus 2 --rank-mem-bw 10",
       "--rank-mem-bw is for --gpu cpu"},
      {"plan --model llama-2-7b --gpu cpu --gpus 2 --mem-bw 20 --rank-mem-bw -3",
       "--rank-mem-bw must be positive, got -3"},
      {"plan --model llama-2-7b --gpu a100-80g --gpus 2 --shared-cores 1",
       "--shared-cores 1 is for --gpu cpu"},
      {"plan --model tiny --gpu cpu --gpus 4 --mem-bw 20 --train --shared-cores 2",
       "--shared-cores 2 is for inference plans"},
      {"plan --model tiny --gpu cpu --gpus 4 --mem-bw 20 --shared-cores 0", "--shared-cores"},
      {"plan --model tiny --gpu cpu --gpus 2 --mem-bw 20 --reread-bw -5",
       "--reread-bw must be positive, got -5"},
      {"plan --model llama-2-7b --gpu a100-80g --gpus 2 --reread-bw 90",
       "--reread-bw 90 is for --gpu cpu"},
      {"plan --model tiny --gpu cpu --gpus 2 --mem-bw 20 --train --reread-bw 90",
       "--reread-bw 90 is for inference plans"},
      {"plan --model tiny --gpus 2 --train --sp --no-sp", "--sp and --no-sp"},
      {"plan --model tiny --gpus 2 --train --dtype int8", "--dtype int8"},
      {"plan --model tiny --gpus 2 --train --schedule zigzag", "zigzag"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const CmdResult r = run_cli(c.args);
    EXPECT_NE(r.code, 0);
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  std::filesystem::remove(bad_topo);
}

}  // namespace
