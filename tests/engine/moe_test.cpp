// Mixtral-shaped models (mixture of experts): the forward pass against the PyTorch reference
// (tests/reference/llama_ref.py, written from the router's formulas), and `generate --ep N` (with
// --tp and --pp) giving the same greedy tokens and logits as one rank; bad layouts and models
// refused in one line.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <mutex>
#include <sstream>
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

std::string make_mixtral(const TempDir& tmp, const std::string& name = "mixtral") {
  const std::string dir = tmp.file(name);
  auto init = run_parallm("init-model --shape mixtral-tiny --seed 5 --dtype f32 --out " + dir);
  EXPECT_EQ(init.exit_code, 0) << init.output;
  return dir;
}

TEST(Mixtral, MatchesPyTorchReference) {
  if (run_command("/usr/bin/python3 -c 'import torch'").exit_code != 0)
    GTEST_SKIP() << "/usr/bin/python3 has no torch";
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  const double worst =
      testing::moe_reference_error(dir, tmp, "mixtral-tiny", {1, 17, 42, 99, 3}, 32);
  EXPECT_LT(worst, 1e-5);
}

// stdout of `generate --print-ids --print-logits` (one prompt, or a batch of three) at `layout`.
// stdout alone (a subshell drops stderr before run_command merges the two): rank 0's summary on
// stderr could otherwise land in the middle of the printer's lines.
std::string generate_stdout(const std::string& dir, const std::string& layout, bool batch,
                            const TempDir& tmp, int max_tokens) {
  std::string prompt = "--prompt-ids 1,7,11";
  if (batch) {
    std::ofstream(tmp.file("prompts.txt")) << "1,7,11\n1\n1,100,5,9,33,2,8\n";
    prompt = "--prompts-file " + tmp.file("prompts.txt");
  }
  auto r = testing::run_command("(" PARALLM_BIN " generate --model " + dir + " " + prompt +
                                " --max-tokens " + std::to_string(max_tokens) +
                                " --print-ids --print-logits --ignore-eos "
                                "--threads 1 --comm-timeout 60 " +
                                layout + " 2>/dev/null)");
  EXPECT_EQ(r.exit_code, 0) << layout << ": " << r.output;
  return r.output;
}

// Tokens and logits as printed (one prompt, or a batch of three).
std::string generate_ids(const std::string& dir, const std::string& layout, bool batch,
                         const TempDir& tmp) {
  const std::string output = generate_stdout(dir, layout, batch, tmp, 12);
  // Only the tokens and logits: the summary lines name the layout.
  const std::string kept = testing::generated_lines(output);
  EXPECT_NE(kept.find("logits"), std::string::npos) << layout << ": " << output;
  return kept;
}

TEST(MixtralEp, GenerateAtEveryEpIsEpOneBitForBit) {
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  // Logits printed to 6 digits and tokens: the same text at every EP (the sums do not change).
  const std::string one = generate_ids(dir, "--micro-batches 1", true, tmp);
  for (const char* layout : {"--ep 2", "--ep 3", "--ep 8"})
    EXPECT_TRUE(generate_ids(dir, layout, true, tmp) == one) << layout;
  // The pipeline: the same layers, the same sums.
  EXPECT_TRUE(generate_ids(dir, "--ep 2 --pp 2 --micro-batches 1", true, tmp) == one);
  // TP changes the sums of attention and experts: compare with TP 2 at EP 1.
  const std::string tp2 = generate_ids(dir, "--tp 2 --micro-batches 1", true, tmp);
  for (const char* layout : {"--ep 2 --tp 2", "--ep 4 --tp 2", "--ep 8 --tp 2",
                             "--ep 2 --tp 2 --pp 2 --micro-batches 1", "--ep 3 --tp 2 --pp 2"})
    EXPECT_TRUE(generate_ids(dir, layout, true, tmp) == tp2) << layout;
  EXPECT_TRUE(generate_ids(dir, "--ep 3 --pp 2", true, tmp) == one);
  // --pp-split on: the stage's TP x EP ranks (attention replicated over EP) each send a block.
  EXPECT_TRUE(generate_ids(dir, "--ep 3 --pp 2 --pp-split on", true, tmp) == one);
  EXPECT_TRUE(generate_ids(dir, "--ep 2 --tp 2 --pp 2 --pp-split on", true, tmp) == tp2);
  // Batch-1 decode (one prompt): all ranks but one route no token at every decode step.
  EXPECT_TRUE(generate_ids(dir, "--ep 4", false, tmp) ==
              generate_ids(dir, "--micro-batches 1", false, tmp));
}

TEST(MixtralEp, MemStatsShowEachRankLoadsOnlyItsExperts) {
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  auto r = run_parallm("generate --model " + dir +
                       " --prompt-ids 1 --max-tokens 1 --ep 3 --threads 1 --mem-stats 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // mixtral-tiny: hidden 64, FFN 96, 2 layers; an expert is 3 x 96 x 64 floats. EP 3 holds 3, 3,
  // 2 experts: ranks 0 and 2 differ by one expert per layer.
  auto bytes_of = [&](int rank) {
    const size_t at = r.output.find("rank " + std::to_string(rank) + "/3");
    EXPECT_NE(at, std::string::npos) << r.output;
    const size_t b = r.output.find('(', r.output.find("weights", at));
    return std::stoll(r.output.substr(b + 1));
  };
  EXPECT_EQ(bytes_of(0) - bytes_of(2), 2 * 3 * 96 * 64 * 4);
  EXPECT_EQ(bytes_of(0), bytes_of(1));
}

TEST(MixtralEp, TensorTableBytesEqualWhatEachRankLoads) {
  // The planner's count (llama_rank_share, the engine's placement) equals LlamaModel's bytes on
  // every rank, bf16 matrices with the router kept in f32, at even and uneven expert splits.
  TempDir tmp;
  const std::string dir = tmp.file("bf16");
  ASSERT_EQ(run_parallm("init-model --shape mixtral-tiny --dtype bf16 --out " + dir).exit_code, 0);
  ModelConfig config;
  auto source = open_model(dir, &config);
  for (auto tp_ep : {std::pair{1, 1}, {1, 3}, {2, 2}, {1, 8}}) {
    // Plain names, not a structured binding: clang 14 cannot capture those in a lambda.
    const int tp = tp_ep.first, ep = tp_ep.second;
    std::mutex mu;
    std::vector<std::pair<uint64_t, uint64_t>> got;
    comm::LaunchOptions lo;
    lo.backend = "local";
    lo.timeout_s = 60;
    comm::launch(tp * ep, lo, [&](comm::Group world) {
      comm::Mesh mesh(world, {tp, 1, ep, ep});
      LlamaOptions mo;
      mo.weight_dtype = DType::BF16;
      mo.ep = mesh.ep();
      LlamaModel model(config, *source, mesh.tp(), mo);
      const uint64_t want = llama_rank_share(config, tp, mesh.tp_rank(), 0,
                                             config.num_hidden_layers, ep, mesh.ep_rank())
                                .bytes(DType::BF16);
      std::lock_guard<std::mutex> lock(mu);
      got.emplace_back(model.weight_bytes(), want);
    });
    for (const auto& [loaded, counted] : got)
      EXPECT_EQ(loaded, counted) << "tp " << tp << " ep " << ep;
  }
}

TEST(MixtralEp, EachRankReadsOnlyItsExperts) {
  // f32, one weight source per rank: the bytes a rank reads from the file are the bytes it holds.
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint64_t>> got;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(3, lo, [&](comm::Group world) {
    comm::Mesh mesh(world, {1, 1, 3, 3});
    ModelConfig config;
    auto source = open_model(dir, &config);
    LlamaOptions mo;
    mo.weight_dtype = DType::F32;
    mo.ep = mesh.ep();
    LlamaModel model(config, *source, mesh.tp(), mo);
    std::lock_guard<std::mutex> lock(mu);
    got.emplace_back(source->bytes_read(), model.weight_bytes());
  });
  ASSERT_EQ(got.size(), 3u);
  for (const auto& [read, held] : got) EXPECT_EQ(read, held);
}

TEST(MixtralEp, MoeStatsCountEveryRoutedRowOnce) {
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  std::ofstream(tmp.file("prompts.txt")) << "1,7,11\n1\n1,100,5,9\n";
  auto stats = [&](const std::string& layout) {
    auto r =
        run_parallm("generate --model " + dir + " --prompts-file " + tmp.file("prompts.txt") +
                    " --max-tokens 8 --ignore-eos --threads 1 --moe-stats " + layout + " 2>&1");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.output;
  };
  auto line_of = [](const std::string& out, const std::string& start) {
    const size_t at = out.find(start);
    return at == std::string::npos ? std::string() : out.substr(at, out.find('\n', at) - at);
  };
  const std::string one = stats("--ep 1"), three = stats("--ep 3");
  // 8 + 3 x 7 tokens fed (the last sampled token of each sequence is not), 2 layers, top-2.
  const std::string per_expert = line_of(one, "[moe] rows per expert");
  ASSERT_FALSE(per_expert.empty()) << one;
  int64_t total = 0;
  for (size_t at = per_expert.find(": ", per_expert.find("layers)")); at != std::string::npos;
       at = per_expert.find(": ", at + 1))
    total += std::stoll(per_expert.substr(at + 2));
  EXPECT_EQ(total, 29 * 2 * 2) << per_expert;
  EXPECT_EQ(line_of(three, "[moe] rows per expert"), per_expert);
  int64_t ranks = 0;
  for (int r = 0; r < 3; ++r) {
    const std::string l = line_of(three, "[moe] EP rank " + std::to_string(r) + ":");
    ASSERT_FALSE(l.empty()) << three;
    ranks += std::stoll(l.substr(l.find("), ") + 3));
  }
  EXPECT_EQ(ranks, total);
  EXPECT_NE(three.find("[moe] imbalance over 3 EP ranks: max/mean "), std::string::npos) << three;
}

TEST(MixtralEp, BadLayoutsAndModelsFailInOneLine) {
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  auto one_line = [](const testing::CommandResult& r) {
    EXPECT_NE(r.exit_code, 0);
    std::string out = r.output;
    while (!out.empty() && out.back() == '\n') out.pop_back();
    EXPECT_EQ(out.find('\n'), std::string::npos) << out;
    return out;
  };
  const std::string gen = "generate --prompt-ids 1 --max-tokens 2 --threads 1 --model ";
  EXPECT_NE(
      one_line(run_parallm(gen + dir + " --ep 9"))
          .find("--ep 9 exceeds the model's 8 experts (each expert-parallel rank needs at least "
                "one expert)"),
      std::string::npos);
  const std::string dense = tmp.file("dense");
  ASSERT_EQ(run_parallm("init-model --shape tiny --dtype f32 --out " + dense).exit_code, 0);
  EXPECT_NE(one_line(run_parallm(gen + dense + " --ep 2"))
                .find("--ep 2 needs a mixture-of-experts model (this one is dense)"),
            std::string::npos);
  EXPECT_NE(one_line(run_parallm(gen + dense + " --moe-stats"))
                .find("--moe-stats needs a mixture-of-experts model (this one is dense)"),
            std::string::npos);

  // top-k above the experts.
  const std::string topk = make_mixtral(tmp, "topk");
  {
    nlohmann::json j = nlohmann::json::parse(std::ifstream(topk + "/config.json"));
    j["num_experts_per_tok"] = 9;
    std::ofstream(topk + "/config.json") << j.dump();
  }
  EXPECT_NE(one_line(run_parallm(gen + topk)).find("num_experts_per_tok 9 must be in 1..8"),
            std::string::npos);

  // A checkpoint without one expert's w2.
  const std::string holed = make_mixtral(tmp, "holed");
  {
    ModelConfig config;
    auto source = open_model(holed, &config);
    std::vector<std::pair<std::string, Tensor>> kept;
    for (const std::string& name : source->names())
      if (name != "model.layers.1.block_sparse_moe.experts.5.w2.weight")
        kept.emplace_back(name, source->read(name, DType::F32));
    source.reset();
    write_safetensors(holed + "/model.safetensors", kept);
  }
  EXPECT_NE(one_line(run_parallm(gen + holed + " --ep 2"))
                .find("missing tensor \"model.layers.1.block_sparse_moe.experts.5.w2.weight\""),
            std::string::npos);
}

// ---- vLLM's --enable-expert-parallel layout: whole experts over the TP ranks ----

// Printed tokens (the lines that are not logits) and logit rows of a run, stdout only.
struct Printed {
  std::vector<std::string> tokens;
  std::vector<std::vector<double>> logits;
};
Printed generate_printed(const std::string& dir, const std::string& layout, bool batch,
                         const TempDir& tmp) {
  const std::string output = generate_stdout(dir, layout, batch, tmp, 10);
  Printed p;
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty()) continue;
    if (line.rfind("logits", 0) == 0) {
      std::istringstream v(line.substr(line.find(':') + 1));
      p.logits.emplace_back();
      for (double x; v >> x;) p.logits.back().push_back(x);
    } else {
      p.tokens.push_back(line);
    }
  }
  EXPECT_FALSE(p.tokens.empty() || p.logits.empty()) << layout << ": " << output;
  return p;
}

// The same tokens, logits within the TP tests' 1e-5 (normalised): TP re-sums attention, the
// experts are whole (summed as on one rank).
void expect_close(const Printed& got, const Printed& one, const std::string& what) {
  EXPECT_EQ(got.tokens, one.tokens) << what;
  ASSERT_EQ(got.logits.size(), one.logits.size()) << what;
  double worst = 0;
  for (size_t s = 0; s < one.logits.size(); ++s) {
    ASSERT_EQ(got.logits[s].size(), one.logits[s].size()) << what;
    worst = std::max(worst, testing::normalised_error(got.logits[s], one.logits[s]));
  }
  EXPECT_LT(worst, 1e-5) << what;
}

// mixtral-tiny with 6 query / 3 KV heads (hidden 96): TP 3 fits its attention, and 8 experts over
// 3 ranks are 3, 3, 2.
std::string make_mixtral_tp3(const TempDir& tmp) {
  const std::string base = make_mixtral(tmp, "base6");
  nlohmann::json j = nlohmann::json::parse(std::ifstream(base + "/config.json"));
  j["hidden_size"] = 96;
  j["num_attention_heads"] = 6;
  j["num_key_value_heads"] = 3;
  std::ofstream(tmp.file("mixtral6.json")) << j.dump();
  const std::string dir = tmp.file("mixtral6");
  auto init = run_parallm("init-model --shape " + tmp.file("mixtral6.json") +
                          " --seed 5 --dtype f32 --out " + dir);
  EXPECT_EQ(init.exit_code, 0) << init.output;
  return dir;
}

TEST(MixtralExpertParallel, GenerateGivesOneRanksTokens) {
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  // Batch-1 decode through the single-sequence loop, and a batch of three.
  const Printed one = generate_printed(dir, "", false, tmp);
  expect_close(generate_printed(dir, "--tp 2 --enable-expert-parallel", false, tmp), one,
               "--tp 2 (one prompt)");
  const Printed batch_one = generate_printed(dir, "--micro-batches 1", true, tmp);
  const Printed tp2 =
      generate_printed(dir, "--tp 2 --enable-expert-parallel --micro-batches 1", true, tmp);
  expect_close(tp2, batch_one, "--tp 2 (batch)");
  // TP 4: two experts a rank, KV heads replicated.
  expect_close(generate_printed(dir, "--tp 4 --enable-expert-parallel --micro-batches 1", true,
                                tmp),
               batch_one, "--tp 4 (batch)");
  // The pipeline: each stage's TP group is its EP group; the same sums as TP 2 alone.
  const Printed pp =
      generate_printed(dir, "--tp 2 --pp 2 --enable-expert-parallel --micro-batches 1", true, tmp);
  expect_close(pp, batch_one, "--tp 2 --pp 2");
  EXPECT_EQ(pp.tokens, tp2.tokens);
  EXPECT_EQ(pp.logits, tp2.logits) << "--tp 2 --pp 2 against --tp 2, bit for bit as printed";
  // Uneven: 8 experts over TP 3.
  const std::string six = make_mixtral_tp3(tmp);
  expect_close(generate_printed(six, "--tp 3 --enable-expert-parallel", false, tmp),
               generate_printed(six, "", false, tmp), "--tp 3 (one prompt)");
  expect_close(generate_printed(six, "--tp 3 --enable-expert-parallel --micro-batches 1", true,
                                tmp),
               generate_printed(six, "--micro-batches 1", true, tmp), "--tp 3 (batch)");
}

TEST(MixtralExpertParallel, TensorTableBytesEqualWhatEachRankLoads) {
  // llama_rank_share's rule for the layout (whole experts, expert_range over TP) equals the bytes
  // LlamaModel loads on every rank, bf16 with the routers in f32; the experts over the ranks sum
  // to every expert once, each whole.
  TempDir tmp;
  for (const std::string shape : {"mixtral-tiny", "qwen2-moe-tiny"}) {
    const std::string dir = tmp.file(shape);
    ASSERT_EQ(run_parallm("init-model --shape " + shape + " --dtype bf16 --out " + dir).exit_code,
              0);
    ModelConfig config;
    auto source = open_model(dir, &config);
    int64_t expert_numel = 0;  // every expert of every layer, whole
    for (const LlamaTensor& t : llama_tensors(config))
      if (t.part == LlamaPart::Expert) expert_numel += t.numel();
    for (auto tp_pp : {std::pair{1, 1}, {2, 1}, {4, 1}, {2, 2}}) {
      const int tp = tp_pp.first, pp = tp_pp.second;
      if (pp > 1 && config.num_hidden_layers % pp != 0) continue;
      std::mutex mu;
      std::vector<std::pair<uint64_t, uint64_t>> got;
      int64_t experts = 0;
      comm::LaunchOptions lo;
      lo.backend = "local";
      lo.timeout_s = 60;
      comm::launch(tp * pp, lo, [&](comm::Group world) {
        comm::Mesh mesh(world, {tp, pp, 1, 1});
        const int64_t per = config.num_hidden_layers / pp;
        LlamaOptions mo;
        mo.weight_dtype = DType::BF16;
        mo.experts_over_tp = true;
        mo.layer_begin = per * mesh.pp_rank();
        mo.layer_end = mesh.pp_rank() == pp - 1 ? config.num_hidden_layers : mo.layer_begin + per;
        LlamaModel model(config, *source, mesh.tp(), mo);
        const LlamaRankShare share = llama_rank_share(config, tp, mesh.tp_rank(), mo.layer_begin,
                                                      mo.layer_end, 1, 0, true);
        std::lock_guard<std::mutex> lock(mu);
        got.emplace_back(model.weight_bytes(), share.bytes(DType::BF16));
        experts += share.experts;
      });
      ASSERT_EQ(got.size(), size_t(tp * pp));
      for (const auto& [loaded, counted] : got)
        EXPECT_EQ(loaded, counted) << shape << " tp " << tp << " pp " << pp;
      EXPECT_EQ(experts, expert_numel) << shape << " tp " << tp << " pp " << pp;
    }
  }
  // Uneven, TP 3 (8 experts: 3, 3, 2 whole ones): rank 0 holds one more expert per layer than 2.
  const std::string six = make_mixtral_tp3(tmp);
  ModelConfig c6;
  open_model(six, &c6);
  const int64_t one_expert = 3 * c6.intermediate_size * c6.hidden_size;
  EXPECT_EQ(llama_rank_share(c6, 3, 0, 0, 2, 1, 0, true).experts -
                llama_rank_share(c6, 3, 2, 0, 2, 1, 0, true).experts,
            2 * one_expert);
}

TEST(MixtralExpertParallel, MoeStatsAndCommStats) {
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  std::ofstream(tmp.file("prompts.txt")) << "1,7,11\n1\n1,100,5,9\n";
  auto r = run_parallm("generate --model " + dir + " --prompts-file " + tmp.file("prompts.txt") +
                       " --max-tokens 8 --ignore-eos --threads 1 --moe-stats --comm-stats --tp 2 "
                       "--enable-expert-parallel 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // 29 tokens fed, 2 layers, top-2 (as MixtralEp.MoeStatsCountEveryRoutedRowOnce): each TP rank
  // counts its own experts' rows, so the ranks sum to every row once.
  int64_t ranks = 0;
  for (int q = 0; q < 2; ++q) {
    const size_t at = r.output.find("[moe] EP rank " + std::to_string(q) + ": experts [" +
                                    std::to_string(4 * q) + ", " + std::to_string(4 * q + 4));
    ASSERT_NE(at, std::string::npos) << r.output;
    ranks += std::stoll(r.output.substr(r.output.find("), ", at) + 3));
  }
  EXPECT_EQ(ranks, 29 * 2 * 2) << r.output;
  EXPECT_NE(r.output.find("[moe] imbalance over 2 EP ranks: max/mean "), std::string::npos);
  EXPECT_NE(r.output.find("all-reduce (ep_tp)"), std::string::npos) << r.output;
  // The MoE all-reduce is its own group in --comm-stats.
  EXPECT_NE(r.output.find("ep_tp    all_reduce"), std::string::npos) << r.output;
}

TEST(MixtralExpertParallel, BadLayoutsFailInOneLine) {
  TempDir tmp;
  const std::string dir = make_mixtral(tmp);
  const std::string dense = tmp.file("dense");
  ASSERT_EQ(run_parallm("init-model --shape tiny --dtype f32 --out " + dense).exit_code, 0);
  auto error_line = [](const std::string& args) {
    auto r = run_parallm(args);
    EXPECT_NE(r.exit_code, 0) << args;
    std::string out = r.output;
    while (!out.empty() && out.back() == '\n') out.pop_back();
    EXPECT_EQ(out.find('\n'), std::string::npos) << out;
    return out;
  };
  const std::string gen = "generate --prompt-ids 1 --max-tokens 2 --threads 1 --model ";
  EXPECT_EQ(error_line(gen + dense + " --tp 2 --enable-expert-parallel"),
            "parallm: error: [cli] --enable-expert-parallel needs a mixture-of-experts model "
            "(this one is dense)");
  EXPECT_EQ(error_line(gen + dir + " --tp 2 --ep 2 --enable-expert-parallel"),
            "parallm: error: [cli] --enable-expert-parallel places the experts over the --tp "
            "ranks; it does not take --ep 2 as well");
  EXPECT_EQ(error_line(gen + dir + " --tp 16 --enable-expert-parallel"),
            "parallm: error: [cli] --enable-expert-parallel at --tp 16 exceeds the model's 8 "
            "experts (each TP rank holds at least one whole expert)");
  EXPECT_EQ(error_line("bench decode --tokens 1 --warmup 0 --threads 1 --model " + dense +
                       " --enable-expert-parallel"),
            "parallm: error: [cli] --enable-expert-parallel needs a mixture-of-experts model "
            "(this one is dense)");
  // serve: the same lines, before the tokenizer is looked for (neither model has one) and
  // before any rank starts.
  EXPECT_EQ(error_line("serve --port 0 --threads 1 --model " + dense +
                       " --tp 2 --enable-expert-parallel"),
            "parallm: error: [cli] --enable-expert-parallel needs a mixture-of-experts model "
            "(this one is dense)");
  EXPECT_EQ(error_line("serve --port 0 --threads 1 --model " + dir +
                       " --tensor-parallel-size 16 --enable-expert-parallel"),
            "parallm: error: [cli] --enable-expert-parallel at --tp 16 exceeds the model's 8 "
            "experts (each TP rank holds at least one whole expert)");
}

}  // namespace
}  // namespace parallm
