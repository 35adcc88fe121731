// The table of LLaMA tensors: names and shapes in checkpoint order, each rule's slices cover the
// full dimension exactly once over a TP group (KV heads exactly tp / kv_heads times when
// replicated), the TP sizes it accepts are HeadPlan's, and the bytes per rank by hand.
#include "parallm/model/llama_tensors.h"

#include <gtest/gtest.h>

#include <map>

#include "parallm/core/error.h"
#include "parallm/parallel/shard.h"
#include "model/tiny_config.h"
#include "test_util.h"

namespace parallm {
namespace {

ModelConfig small_config(bool tied) { return testing::tiny_gqa_config(tied); }

// Heads of width 2, an FFN of 13 and a vocabulary of 11 (split unevenly by most sizes).
ModelConfig heads_config(int64_t q_heads, int64_t kv_heads) {
  ModelConfig c;
  c.head_dim = 2;
  c.hidden_size = 2 * q_heads;
  c.intermediate_size = 13;
  c.num_hidden_layers = 3;
  c.num_attention_heads = q_heads;
  c.num_key_value_heads = kv_heads;
  c.vocab_size = 11;
  c.validate("heads");
  return c;
}

TEST(LlamaTensors, NamesAndShapesInCheckpointOrder) {
  const ModelConfig c = small_config(false);
  const std::vector<LlamaTensor> t = llama_tensors(c);
  ASSERT_EQ(t.size(), 1u + 2 * 9 + 2);
  EXPECT_EQ(t[0].name, "model.embed_tokens.weight");
  EXPECT_EQ(t[0].shape, (Shape{10, 8}));
  EXPECT_EQ(t[0].rule, ShardRule::VocabRows);
  const std::vector<std::pair<std::string, Shape>> layer1 = {
      {"model.layers.1.input_layernorm.weight", {8}},
      {"model.layers.1.self_attn.q_proj.weight", {8, 8}},
      {"model.layers.1.self_attn.k_proj.weight", {4, 8}},
      {"model.layers.1.self_attn.v_proj.weight", {4, 8}},
      {"model.layers.1.self_attn.o_proj.weight", {8, 8}},
      {"model.layers.1.post_attention_layernorm.weight", {8}},
      {"model.layers.1.mlp.gate_proj.weight", {12, 8}},
      {"model.layers.1.mlp.up_proj.weight", {12, 8}},
      {"model.layers.1.mlp.down_proj.weight", {8, 12}}};
  const std::vector<ShardRule> rules = {
      ShardRule::Replicated, ShardRule::QHeadRows, ShardRule::KvHeadRows,
      ShardRule::KvHeadRows, ShardRule::QHeadCols, ShardRule::Replicated,
      ShardRule::FfnRows,    ShardRule::FfnRows,   ShardRule::FfnCols};
  for (size_t i = 0; i < layer1.size(); ++i) {
    const LlamaTensor& x = t[10 + i];
    EXPECT_EQ(x.name, layer1[i].first);
    EXPECT_EQ(x.shape, layer1[i].second) << x.name;
    EXPECT_EQ(x.rule, rules[i]) << x.name;
    EXPECT_EQ(x.layer, 1) << x.name;
    EXPECT_EQ(x.matrix, x.shape.size() == 2) << x.name;
  }
  EXPECT_EQ(t[19].name, "model.norm.weight");
  EXPECT_FALSE(t[19].matrix);
  EXPECT_EQ(t[20].name, "lm_head.weight");
  EXPECT_EQ(t[20].shape, (Shape{10, 8}));

  // Tied: no lm_head; the same tensors otherwise.
  const std::vector<LlamaTensor> tied = llama_tensors(small_config(true));
  ASSERT_EQ(tied.size(), t.size() - 1);
  EXPECT_EQ(tied.back().name, "model.norm.weight");
  EXPECT_FALSE(find_llama_tensor(small_config(true), "lm_head.weight"));
  EXPECT_EQ(find_llama_tensor(c, "lm_head.weight")->rule, ShardRule::VocabRows);
  EXPECT_EQ(find_llama_tensor(c, "model.layers.1.mlp.down_proj.weight")->shape, (Shape{8, 12}));
  EXPECT_FALSE(find_llama_tensor(c, "model.layers.2.mlp.down_proj.weight"));  // 2 layers only
  EXPECT_FALSE(find_llama_tensor(c, "model.layers.1.mlp.nope.weight"));

  // Mixture of experts: the router, then w1, w2, w3 of each expert.
  ModelConfig moe = c;
  moe.num_local_experts = 3;
  moe.num_experts_per_tok = 2;
  const std::vector<LlamaTensor> m = llama_layer_tensors(moe, 0);
  ASSERT_EQ(m.size(), 6u + 1 + 3 * 3);
  EXPECT_EQ(m[6].name, "model.layers.0.block_sparse_moe.gate.weight");
  EXPECT_EQ(m[6].shape, (Shape{3, 8}));
  EXPECT_EQ(m[11].name, "model.layers.0.block_sparse_moe.experts.1.w2.weight");
  EXPECT_EQ(m[11].rule, ShardRule::FfnCols);
  EXPECT_EQ(m[11].expert, 1);
}

TEST(LlamaTensors, TpSizesAreHeadPlans) {
  for (auto heads : std::vector<std::pair<int64_t, int64_t>>{
           {24, 24}, {8, 2}, {12, 6}, {32, 4}, {6, 1}, {64, 8}}) {
    // Plain names, not a structured binding: clang 14 cannot capture those in a lambda.
    const int64_t q = heads.first, kv = heads.second;
    const ModelConfig c = heads_config(q, kv);
    for (int tp = 0; tp <= 70; ++tp) {
      const std::string problem = llama_tp_problem(c, tp);
      const std::string engine = testing::error_of([&] { parallel::HeadPlan::make(q, kv, tp, 0); });
      if (engine == "no error" && tp <= c.vocab_size) {  // vocab 11 < FFN 13
        EXPECT_EQ(problem, "") << q << "/" << kv << " tp " << tp;
      } else if (engine != "no error") {
        EXPECT_EQ("[tp] " + problem, engine) << q << "/" << kv << " tp " << tp;
      } else {  // 24 heads fit tp 12 and 24, but a vocabulary of 11 leaves rank 0 empty
        EXPECT_NE(problem.find("leaves rank 0 no rows of the FFN (13) or vocabulary (11)"),
                  std::string::npos)
            << problem;
      }
    }
  }
  EXPECT_NE(testing::error_of([] {
              const ModelConfig c = heads_config(8, 2);
              llama_tensor_slice(llama_tensors(c)[1], c, 3, 0);
            }).find("sizes that work: 1, 2, 4, 8"),
            std::string::npos);
}

// Over the ranks of each TP size that fits, every split dimension is covered exactly once in rank
// order; KV rows are covered tp / kv_heads times when replicated; replicated tensors whole.
TEST(LlamaTensors, SlicesCoverEachDimensionExactlyOnce) {
  for (auto [q, kv] :
       std::vector<std::pair<int64_t, int64_t>>{{24, 24}, {8, 2}, {12, 6}, {8, 1}, {6, 3}}) {
    const ModelConfig c = heads_config(q, kv);
    int tried = 0;
    for (int tp = 1; tp <= 8; ++tp) {
      if (!llama_tp_problem(c, tp).empty()) continue;
      ++tried;
      for (const LlamaTensor& t : llama_tensors(c)) {
        SCOPED_TRACE(cat(t.name, " q ", q, " kv ", kv, " tp ", tp));
        std::map<int64_t, int> held;  // index along the split dimension -> ranks holding it
        int64_t next = 0;
        for (int r = 0; r < tp; ++r) {
          const Slice s = llama_tensor_slice(t, c, tp, r);
          switch (t.rule) {
            case ShardRule::Replicated:
              EXPECT_EQ(s.kind, Slice::Kind::All);
              continue;
            case ShardRule::QHeadCols:
            case ShardRule::FfnCols:
              EXPECT_EQ(s.kind, Slice::Kind::Cols);
              break;
            default:
              EXPECT_EQ(s.kind, Slice::Kind::Rows);
          }
          const int64_t n = t.shape.at(s.kind == Slice::Kind::Cols ? 1 : 0);
          EXPECT_LT(s.begin, s.end);
          EXPECT_LE(s.end, n);
          for (int64_t i = s.begin; i < s.end; ++i) ++held[i];
          const bool replicated_kv = t.rule == ShardRule::KvHeadRows && tp > kv;
          if (!replicated_kv) {
            EXPECT_EQ(s.begin, next) << "rank " << r;  // contiguous, in rank order
            next = s.end;
          } else {
            EXPECT_EQ(s.end - s.begin, c.head_dim);  // one KV head per rank
          }
        }
        if (t.rule == ShardRule::Replicated) continue;
        const int64_t n =
            t.shape.at(t.rule == ShardRule::QHeadCols || t.rule == ShardRule::FfnCols);
        const int copies = t.rule == ShardRule::KvHeadRows && tp > kv ? int(tp / kv) : 1;
        ASSERT_EQ(int64_t(held.size()), n);
        for (auto [i, k] : held) EXPECT_EQ(k, copies) << "index " << i;
      }
    }
    EXPECT_GE(tried, 3);
  }
}

TEST(LlamaTensors, RankBytesByHand) {
  // small, untied, bf16, TP 2 (one KV head: replicated), one stage. Per layer for either rank:
  // q 4x8, k 4x8, v 4x8, o 8x4, gate and up 6x8 each, down 8x6 (matrices: 272) and 2 norms of 8.
  const ModelConfig c = small_config(false);
  const int64_t layer_matrices = 32 + 32 + 32 + 32 + 48 + 48 + 48;
  LlamaRankShare s = llama_rank_share(c, 2, 1, 0, 2);
  EXPECT_EQ(s.attention, 2 * 128);
  EXPECT_EQ(s.mlp, 2 * 144);
  EXPECT_EQ(s.norms, 2 * 16 + 8);
  EXPECT_EQ(s.embedding, 5 * 8);
  EXPECT_EQ(s.head, 5 * 8);
  EXPECT_EQ(llama_rank_weight_bytes(c, DType::BF16, 2, 1, 0, 2),
            uint64_t((2 * layer_matrices + 80) * 2 + 40 * 4));
  EXPECT_EQ(llama_rank_weight_bytes(c, DType::F32, 2, 1, 0, 2),
            uint64_t((2 * layer_matrices + 80) * 4 + 40 * 4));

  // Uneven shards: 6 heads of 2 at TP 3; vocab 11 splits 3, 4, 4 and FFN 13 splits 4, 4, 5.
  const ModelConfig h = heads_config(6, 3);  // hidden 12
  const LlamaRankShare r0 = llama_rank_share(h, 3, 0, 0, 3), r2 = llama_rank_share(h, 3, 2, 0, 3);
  EXPECT_EQ(r0.embedding, 3 * 12);
  EXPECT_EQ(r2.embedding, 4 * 12);
  EXPECT_EQ(r0.mlp, 3 * (3 * 4 * 12));
  EXPECT_EQ(r2.mlp, 3 * (3 * 5 * 12));

  // Tied: the LM head is the embedding's rows; one stage counts them once, while a last stage
  // without the embedding holds its own copy.
  const ModelConfig t = small_config(true);
  const LlamaRankShare one = llama_rank_share(t, 1, 0, 0, 2);
  EXPECT_EQ(one.embedding, 80);
  EXPECT_EQ(one.head, 0);
  const LlamaRankShare first = llama_rank_share(t, 1, 0, 0, 1),
                       last = llama_rank_share(t, 1, 0, 1, 2);
  EXPECT_EQ(first.embedding, 80);
  EXPECT_EQ(first.head, 0);
  EXPECT_EQ(first.norms, 16);
  EXPECT_EQ(last.embedding, 0);
  EXPECT_EQ(last.head, 80);
  EXPECT_EQ(last.norms, 16 + 8);

  // Over the ranks of a TP group without KV replication the matrices add up to the model's.
  const ModelConfig g = heads_config(12, 6);
  for (int tp : {1, 2, 3, 6}) {
    int64_t matrices = 0;
    for (int r = 0; r < tp; ++r) matrices += llama_rank_share(g, tp, r, 0, 3).matrices();
    EXPECT_EQ(matrices + 7 * 24, g.param_count()) << "tp " << tp;  // norms: 3 x 2 + final, once
  }

  EXPECT_NE(testing::error_of([&] { llama_rank_share(c, 1, 0, 1, 1); }).find("layer range [1, 1)"),
            std::string::npos);
}

}  // namespace
}  // namespace parallm
