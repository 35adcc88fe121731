// The planner's weight bytes per rank equal the engine's, exactly: every rank of every layout
// builds its LlamaModel as `parallm generate` does (comm::launch, the mesh, the engine's stage
// partition) and its weight_bytes(), which --mem-stats prints, is compared with
// plan::rank_weight_bytes for that (stage, TP rank), and the planner's per-device figure
// (inference_memory) with the fullest rank's; the planner's activations hold the workspace the
// engine allocates. On stories260K (tied embeddings, an FFN of 172 that
// TP 8 splits unevenly, 4 KV heads replicated at TP 8) and on the TinyLlama shape (zero weights
// served without a file, so nothing but allocation happens).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <regex>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/core/error.h"
#include "parallm/model/init_model.h"
#include "parallm/model/llama.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/partition.h"
#include "parallm/plan/memory.h"
#include "test_util.h"

namespace parallm::plan {
namespace {

// Tensors of the given shapes, every element zero, in any dtype asked: a stand-in checkpoint of
// any size that costs only the allocation of what a rank keeps. The shapes are written here by
// hand from the config (not taken from the tensor table the planner uses).
class ZeroSource : public WeightSource {
 public:
  ZeroSource(const ModelConfig& c, DType dtype) : dtype_(dtype) {
    const int64_t h = c.hidden_size, f = c.intermediate_size;
    shapes_[names::kEmbed] = {c.vocab_size, h};
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      shapes_[names::layer(i, "input_layernorm.weight")] = {h};
      shapes_[names::layer(i, "post_attention_layernorm.weight")] = {h};
      shapes_[names::layer(i, "self_attn.q_proj.weight")] = {c.q_dim(), h};
      shapes_[names::layer(i, "self_attn.k_proj.weight")] = {c.kv_dim(), h};
      shapes_[names::layer(i, "self_attn.v_proj.weight")] = {c.kv_dim(), h};
      shapes_[names::layer(i, "self_attn.o_proj.weight")] = {h, c.q_dim()};
      shapes_[names::layer(i, "mlp.gate_proj.weight")] = {f, h};
      shapes_[names::layer(i, "mlp.up_proj.weight")] = {f, h};
      shapes_[names::layer(i, "mlp.down_proj.weight")] = {h, f};
    }
    shapes_[names::kNorm] = {h};
    if (!c.tie_word_embeddings) shapes_[names::kLmHead] = {c.vocab_size, h};
  }
  bool has(const std::string& name) const override { return shapes_.count(name) > 0; }
  TensorInfo info(const std::string& name) const override {
    if (!has(name)) fail("zeros", "no tensor \"", name, "\"");
    return {name, dtype_, shapes_.at(name)};
  }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [name, shape] : shapes_) out.push_back(name);
    return out;
  }
  Tensor read(const std::string& name, DType dtype, Slice slice) const override {
    Shape shape = info(name).shape;
    if (slice.kind == Slice::Kind::Rows) shape[0] = slice.end - slice.begin;
    if (slice.kind == Slice::Kind::Cols) shape[1] = slice.end - slice.begin;
    // Untouched pages of an anonymous mapping read as zeros: no memset of gigabytes.
    Tensor t = Tensor::empty(dtype, shape);
    read_ += t.nbytes();
    return t;
  }
  uint64_t bytes_read() const override { return read_; }
  std::string describe() const override { return "zeros"; }

 private:
  DType dtype_;
  std::map<std::string, Shape> shapes_;
  mutable std::atomic<uint64_t> read_{0};
};

Precision precision_of(DType d) {
  switch (d) {
    case DType::F32:
      return Precision::FP32;
    case DType::F16:
      return Precision::FP16;
    default:
      return Precision::BF16;
  }
}

// Builds every rank of tp x pp as the engine's run_model does and checks each rank's
// weight_bytes() against the planner. Returns the engine's bytes, indexed [stage][tp rank].
std::vector<std::vector<uint64_t>> expect_planner_matches_engine(const ModelConfig& config,
                                                                 const WeightSource& source,
                                                                 DType dtype, int tp, int pp) {
  SCOPED_TRACE(cat("tp ", tp, " pp ", pp, " ", dtype_name(dtype)));
  const std::vector<pipeline::StageLayers> stages =
      pipeline::partition_layers(config.num_hidden_layers, pp);
  std::vector<std::vector<uint64_t>> engine(pp, std::vector<uint64_t>(tp));
  // The engine's workspace for a step of 2 prompts of 5 tokens, per stage: the fullest rank's.
  const int64_t micro_batch = 2, prompt = 5;
  std::vector<uint64_t> workspace(pp, 0);
  std::mutex mu;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 120;
  comm::launch(tp * pp, lo, [&](comm::Group world) {
    comm::Mesh mesh(world, {tp, pp, 1, 1});
    LlamaOptions mo;
    mo.weight_dtype = dtype;
    mo.layer_begin = stages[mesh.pp_rank()].begin;
    mo.layer_end = stages[mesh.pp_rank()].end;
    const LlamaModel model(config, source, mesh.tp(), mo);
    const uint64_t ws = model.make_workspace(micro_batch * prompt).bytes();
    std::lock_guard<std::mutex> lock(mu);
    engine[mesh.pp_rank()][mesh.tp_rank()] = model.weight_bytes();
    workspace[mesh.pp_rank()] = std::max(workspace[mesh.pp_rank()], ws);
  });

  const Layout layout{tp, pp, 1, 1};
  EXPECT_EQ(layout_problem(config, layout), "");
  InferenceWorkload w;
  w.weights = precision_of(dtype);
  w.prompt_len = prompt;
  for (int s = 0; s < pp; ++s) {
    uint64_t fullest = 0;
    for (int r = 0; r < tp; ++r) {
      EXPECT_EQ(rank_weight_bytes(config, layout, w.weights, s, r), double(engine[s][r]))
          << "stage " << s << " rank " << r;
      fullest = std::max(fullest, engine[s][r]);
    }
    const MemoryBreakdown m = inference_memory(config, layout, w, s, micro_batch, micro_batch);
    EXPECT_EQ(m.weights, double(fullest)) << "stage " << s;
    // Activations: the workspace the engine allocates, the residual stream, the last's logits.
    double logits = 0;
    if (s == pp - 1)
      logits = double(micro_batch) * double((config.vocab_size + tp - 1) / tp) * sizeof(float);
    EXPECT_EQ(m.activations, double(workspace[s]) +
                                 double(micro_batch * prompt * config.hidden_size) * sizeof(float) +
                                 logits)
        << "stage " << s;
  }
  return engine;
}

TEST(PlanWeightBytes, EqualTheEnginesOnStories260K) {
  ModelConfig config;
  const auto source = open_model(testing::stories_model(), &config);
  ASSERT_TRUE(config.tie_word_embeddings);
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (int tp : {1, 2, 4, 8}) {
      const auto engine = expect_planner_matches_engine(config, *source, dtype, tp, 1);
      if (tp == 8) {  // FFN 172 over 8: shards of 21 and 22 rows, so the ranks differ
        EXPECT_NE(engine[0][0], engine[0][1]);
      }
    }
    for (int pp : {2, 3}) expect_planner_matches_engine(config, *source, dtype, 1, pp);
    expect_planner_matches_engine(config, *source, dtype, 2, 3);
    expect_planner_matches_engine(config, *source, dtype, 8, 2);
  }
}

TEST(PlanWeightBytes, EqualTheEnginesOnTheTinyLlamaShape) {
  const ModelConfig config = shape_preset("tinyllama-1.1b");
  ASSERT_FALSE(config.tie_word_embeddings);
  const ZeroSource source(config, DType::BF16);
  for (int tp : {1, 2, 4, 8}) expect_planner_matches_engine(config, source, DType::BF16, tp, 1);
  // 22 layers over 3 stages: 7, 8, 7 (the leftover layer in the middle). A layer by hand: q and o
  // 2048 x 2048, k and v 256 x 2048, gate, up, down 5632 x 2048, in bf16; two norms of 2048 f32.
  const uint64_t layer = 2048ull * (2 * 2048 + 2 * 256 + 3 * 5632) * 2 + 2 * 2048 * 4;
  const uint64_t table = 32000ull * 2048 * 2;
  const auto pp3 = expect_planner_matches_engine(config, source, DType::BF16, 1, 3);
  EXPECT_EQ(pp3[0][0], 7 * layer + table);
  EXPECT_EQ(pp3[1][0], 8 * layer);
  EXPECT_EQ(pp3[2][0], 7 * layer + 2048 * 4 + table);
  expect_planner_matches_engine(config, source, DType::BF16, 1, 2);
}

// What --mem-stats prints is the planner's figure for each rank, to the byte: the weights at load,
// and after the run the activation workspace the engine allocated (LlamaModel::workspace_bytes,
// which the planner's activation memory uses), sized for the step's 2 prompt tokens.
TEST(PlanWeightBytes, MemStatsPrintsThePlannersBytes) {
  const testing::CommandResult r = testing::run_parallm(
      "generate --model " + testing::stories_model() +
      " --tp 2 --pp 2 --dtype f32 --prompt-ids 1,2 --max-tokens 1 --mem-stats");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ModelConfig config;
  open_model(testing::stories_model(), &config);
  const std::regex line(
      R"(\[mem\] rank \d+/4 \(tp (\d), stage (\d)[^)]*\): weights ([0-9.]+) MiB \((\d+) bytes)");
  int seen = 0;
  for (std::sregex_iterator it(r.output.begin(), r.output.end(), line), end; it != end; ++it) {
    const int tp_rank = std::stoi((*it)[1]), stage = std::stoi((*it)[2]);
    const double bytes = rank_weight_bytes(config, {2, 2, 1, 1}, Precision::FP32, stage, tp_rank);
    char want[64];
    std::snprintf(want, sizeof want, "%.2f", bytes / 1048576.0);
    EXPECT_EQ((*it)[3].str(), want) << "stage " << stage << " rank " << tp_rank;
    EXPECT_EQ(std::stod((*it)[4]), bytes) << "stage " << stage << " rank " << tp_rank;
    ++seen;
  }
  EXPECT_EQ(seen, 4) << r.output;
  // World rank w is TP rank w % 2 (TP fastest).
  const std::regex ws_line(R"(\[mem\] rank (\d+): KV cache [^,]*, workspace [0-9.]+ MiB \((\d+) bytes)");
  int ws_seen = 0;
  for (std::sregex_iterator it(r.output.begin(), r.output.end(), ws_line), end; it != end; ++it) {
    const int w = std::stoi((*it)[1]);
    EXPECT_EQ(std::stoull((*it)[2]), LlamaModel::workspace_bytes(config, 2, w % 2, 2))
        << "rank " << w;
    ++ws_seen;
  }
  EXPECT_EQ(ws_seen, 4) << r.output;
}

}  // namespace
}  // namespace parallm::plan
