// Qwen2-MoE-shaped models (model_type qwen2_moe: shared expert, top-k without renormalisation,
// q/k/v biases, dense layers in mlp_only_layers): the forward pass against the PyTorch reference
// (tests/reference/llama_ref.py, written from the formulas), `generate --ep N` (with --tp and
// --pp) giving the same tokens and logits as one rank, each rank loading the bytes the tensor
// table counts, and bad configs and checkpoints refused in one line.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/engine/generate.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/weights.h"
#include "engine/moe_reference.h"
#include "test_util.h"

namespace parallm {
namespace {

using testing::run_command;
using testing::run_parallm;
using testing::TempDir;

std::string make_qwen(const TempDir& tmp, const std::string& name = "qwen",
                      const std::string& dtype = "f32") {
  const std::string dir = tmp.file(name);
  auto init =
      run_parallm("init-model --shape qwen2-moe-tiny --seed 7 --dtype " + dtype + " --out " + dir);
  EXPECT_EQ(init.exit_code, 0) << init.output;
  return dir;
}

TEST(Qwen2Moe, ConfigReadsEveryField) {
  TempDir tmp;
  const std::string dir = make_qwen(tmp);
  const ModelConfig c = ModelConfig::from_file(dir + "/config.json");
  EXPECT_TRUE(c.is_qwen2_moe());
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.num_local_experts, 8);
  EXPECT_EQ(c.expert_ffn(), 48);
  EXPECT_EQ(c.shared_expert_intermediate_size, 80);
  EXPECT_TRUE(c.layer_is_moe(0));
  EXPECT_FALSE(c.layer_is_moe(1));  // mlp_only_layers [1]
  EXPECT_TRUE(c.layer_is_moe(2));
  // Every tensor of the table counted once: the parameter count is the table's sum.
  int64_t n = 0;
  for (const LlamaTensor& t : llama_tensors(c)) n += t.numel();
  EXPECT_EQ(c.param_count(), n);
  // decoder_sparse_step 2: layers 1, 3 sparse (0, 2 dense).
  ModelConfig s = c;
  s.mlp_only_layers.clear();
  s.decoder_sparse_step = 2;
  EXPECT_FALSE(s.layer_is_moe(0));
  EXPECT_TRUE(s.layer_is_moe(1));
  EXPECT_FALSE(s.layer_is_moe(2));
}

TEST(Qwen2Moe, MatchesPyTorchReference) {
  if (run_command("/usr/bin/python3 -c 'import torch'").exit_code != 0)
    GTEST_SKIP() << "/usr/bin/python3 has no torch";
  TempDir tmp;
  const std::string dir = make_qwen(tmp);
  ModelConfig config;
  open_model(dir, &config);
  EXPECT_TRUE(config.is_qwen2_moe());
  const double worst =
      testing::moe_reference_error(dir, tmp, "qwen2-moe-tiny", {1, 17, 42, 99, 3}, 32);
  EXPECT_LT(worst, 1e-5);
}

// Printed tokens and logits (a batch of three prompts), or the token lines alone.
std::string generate_ids(const std::string& dir, const std::string& layout, const TempDir& tmp,
                         bool tokens_only = false) {
  std::ofstream(tmp.file("prompts.txt")) << "1,7,11\n1\n1,100,5,9,33,2,8\n";
  auto r = run_command("(" PARALLM_BIN " generate --model " + dir + " --prompts-file " +
                       tmp.file("prompts.txt") +
                       " --max-tokens 12 --print-ids --print-logits --ignore-eos "
                       "--threads 1 --comm-timeout 60 " +
                       layout + " 2>/dev/null)");
  EXPECT_EQ(r.exit_code, 0) << layout << ": " << r.output;
  const std::string kept = testing::generated_lines(r.output, tokens_only);
  EXPECT_NE(kept.find('['), std::string::npos) << layout << ": " << r.output;
  return kept;
}

TEST(Qwen2MoeEp, GenerateAtEveryEpIsEpOneBitForBit) {
  TempDir tmp;
  const std::string dir = make_qwen(tmp);
  const std::string one = generate_ids(dir, "--micro-batches 1", tmp);
  ASSERT_NE(one.find("logits"), std::string::npos) << one;
  for (const char* layout : {"--ep 2", "--ep 3", "--ep 2 --pp 3 --micro-batches 1"})
    EXPECT_TRUE(generate_ids(dir, layout, tmp) == one) << layout;
  // TP changes the sums of attention, experts and the shared expert: compare with TP 2.
  const std::string tp2 = generate_ids(dir, "--tp 2 --micro-batches 1", tmp);
  for (const char* layout :
       {"--ep 2 --tp 2", "--tp 2 --pp 2 --micro-batches 1", "--ep 3 --tp 2 --pp 2"})
    EXPECT_TRUE(generate_ids(dir, layout, tmp) == tp2) << layout;
  // TP 4 replicates each KV head (and its bias rows) on two ranks.
  const std::string tp4 = generate_ids(dir, "--tp 4 --micro-batches 1", tmp);
  EXPECT_TRUE(generate_ids(dir, "--ep 2 --tp 4", tmp) == tp4);
  // TP 2 and 4 against one rank: the same greedy tokens, logits within the f32 summation order
  // (a wrong bias or shared-expert slice would move them by far more).
  auto numbers = [](const std::string& text) {
    std::vector<double> v;
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("logits", 0) != 0) continue;
      std::istringstream in(line.substr(line.find(':') + 1));
      for (double x; in >> x;) v.push_back(x);
    }
    return v;
  };
  const std::vector<double> ref = numbers(one);
  ASSERT_GT(ref.size(), 100u);
  for (const std::string* other : {&tp2, &tp4}) {
    const std::vector<double> got = numbers(*other);
    ASSERT_EQ(got.size(), ref.size());
    double worst = 0;
    for (size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, std::abs(got[i] - ref[i]));
    EXPECT_LT(worst, 1e-4) << (other == &tp2 ? "--tp 2" : "--tp 4");
  }
  EXPECT_EQ(generate_ids(dir, "--tp 2 --micro-batches 1", tmp, true),
            generate_ids(dir, "--micro-batches 1", tmp, true));
  EXPECT_EQ(generate_ids(dir, "--tp 4 --micro-batches 1", tmp, true),
            generate_ids(dir, "--micro-batches 1", tmp, true));
}

TEST(Qwen2MoeEp, TensorTableBytesEqualWhatEachRankLoads) {
  // llama_rank_share (the planner's count: sparse and dense layers, shared experts, biases, the
  // gates in f32) equals LlamaModel's bytes on every rank, bf16, and each rank reads only those.
  TempDir tmp;
  const std::string dir = make_qwen(tmp, "bf16", "bf16");
  ModelConfig config;
  ASSERT_NO_THROW(open_model(dir, &config));
  for (auto sizes : {std::tuple{1, 1, 1}, {1, 3, 1}, {2, 2, 1}, {2, 1, 2}, {1, 8, 1}}) {
    // Plain names, not a structured binding: clang 14 cannot capture those in a lambda.
    const int tp = std::get<0>(sizes), ep = std::get<1>(sizes), pp = std::get<2>(sizes);
    std::mutex mu;
    std::vector<std::pair<uint64_t, uint64_t>> got;
    comm::LaunchOptions lo;
    lo.backend = "local";
    lo.timeout_s = 60;
    comm::launch(tp * ep * pp, lo, [&](comm::Group world) {
      comm::Mesh mesh(world, {tp, pp, ep, ep});
      auto source = open_model(dir, nullptr);
      LlamaOptions mo;
      mo.weight_dtype = DType::BF16;
      mo.ep = mesh.ep();
      // Stage s of pp: layers [3 s / pp, 3 (s + 1) / pp).
      const int64_t L = config.num_hidden_layers;
      mo.layer_begin = L * mesh.pp_rank() / pp;
      mo.layer_end = L * (mesh.pp_rank() + 1) / pp;
      LlamaModel model(config, *source, mesh.tp(), mo);
      const uint64_t want = llama_rank_share(config, tp, mesh.tp_rank(), mo.layer_begin,
                                             mo.layer_end, ep, mesh.ep_rank())
                                .bytes(DType::BF16);
      std::lock_guard<std::mutex> lock(mu);
      got.emplace_back(model.weight_bytes(), want);
      // bf16 on disk, bf16 held: matrices as read; the f32 vectors (norms, biases, gates) are
      // read as bf16 (2 bytes) and kept in f32 (4).
      EXPECT_LE(source->bytes_read(), model.weight_bytes());
    });
    for (const auto& [loaded, counted] : got)
      EXPECT_EQ(loaded, counted) << "tp " << tp << " ep " << ep << " pp " << pp;
  }
}

std::string one_line(const testing::CommandResult& r) {
  EXPECT_NE(r.exit_code, 0);
  std::string out = r.output;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  EXPECT_EQ(out.find('\n'), std::string::npos) << out;
  return out;
}

TEST(Qwen2Moe, BadConfigsAndCheckpointsFailInOneLine) {
  TempDir tmp;
  const std::string gen = "generate --prompt-ids 1 --max-tokens 2 --threads 1 --model ";
  struct Case {
    const char* field;
    nlohmann::json value;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"num_experts_per_tok", 9, "num_experts_per_tok 9 must be in 1..8"},
      {"decoder_sparse_step", 0, "field \"decoder_sparse_step\" must be at least 1, got 0"},
      {"mlp_only_layers", nlohmann::json::array({3}),
       "field \"mlp_only_layers[0]\" = 3 is not a layer in [0, num_hidden_layers 3)"},
      {"mlp_only_layers", "1", "field \"mlp_only_layers\" must be a list of layer indices"},
      {"moe_intermediate_size", 0, "field \"moe_intermediate_size\" must be positive, got 0"},
      {"moe_intermediate_size", nullptr, "missing required field \"moe_intermediate_size\""},
      {"num_experts", 0, "field \"num_experts\" must be positive for model_type \"qwen2_moe\""},
      {"norm_topk_prob", "yes", "field \"norm_topk_prob\" must be true or false"},
      {"use_sliding_window", true, "use_sliding_window true (Qwen2 sliding-window attention)"},
  };
  const std::string dir = make_qwen(tmp);
  const std::string cfg_path = dir + "/config.json";
  const nlohmann::json good = nlohmann::json::parse(std::ifstream(cfg_path));
  for (const Case& c : cases) {
    nlohmann::json j = good;
    if (c.value.is_null())
      j.erase(c.field);
    else
      j[c.field] = c.value;
    std::ofstream(cfg_path) << j.dump();
    const std::string out = one_line(run_parallm(gen + dir));
    EXPECT_NE(out.find(c.says), std::string::npos) << c.field << ": " << out;
  }
  std::ofstream(cfg_path) << good.dump();
  // --ep above the experts; TP above the experts' FFN is caught by the head/FFN check.
  EXPECT_NE(one_line(run_parallm(gen + dir + " --ep 9")).find("--ep 9 exceeds the model's 8"),
            std::string::npos);

  // A LLaMA config with attention_bias true: its biases (o_proj's too) are not loaded, so it is
  // refused rather than run without them.
  const std::string dense = tmp.file("dense");
  ASSERT_EQ(run_parallm("init-model --shape tiny --dtype f32 --out " + dense).exit_code, 0);
  {
    nlohmann::json j = nlohmann::json::parse(std::ifstream(dense + "/config.json"));
    j["attention_bias"] = true;
    std::ofstream(dense + "/config.json") << j.dump();
  }
  EXPECT_NE(one_line(run_parallm(gen + dense))
                .find("attention_bias true is not supported for model_type \"llama\""),
            std::string::npos);

  // Checkpoints without a bias, a shared expert's gate, or an expert's down_proj.
  for (const char* missing :
       {"model.layers.2.self_attn.k_proj.bias", "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.2.mlp.experts.5.down_proj.weight"}) {
    const std::string holed = make_qwen(tmp, std::string("holed") + missing);
    {
      ModelConfig config;
      auto source = open_model(holed, &config);
      std::vector<std::pair<std::string, Tensor>> kept;
      for (const std::string& name : source->names())
        if (name != missing) kept.emplace_back(name, source->read(name, DType::F32));
      source.reset();
      write_safetensors(holed + "/model.safetensors", kept);
    }
    EXPECT_NE(one_line(run_parallm(gen + holed + " --ep 2"))
                  .find(std::string("missing tensor \"") + missing + "\""),
              std::string::npos)
        << missing;
  }
}

}  // namespace
}  // namespace parallm
