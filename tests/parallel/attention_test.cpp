// ParallelAttention against the unsplit layer (TP 1) on random f32 weights: 8 query heads over 2
// KV heads at TP 1, 2 (KV heads split), 4 and 8 (KV heads replicated), and 12 over 6 at TP 1, 2,
// 3, 6 and 12 (replicated at 12), in both RoPE styles. Two sequences run as chunks of one batch:
// a prompt step, then a step that reads the cached positions (decode and a short chunk), and a
// long prompt (T >= 64, the GEMM path). Every rank's output must match the full layer within
// max |parallel - full| / max |full| < 2e-6, and so must the keys and values in its KV cache
// against the full layer's of the same KV heads (a rank caching the wrong head fails by ~1).
#include "parallm/parallel/attention.h"

#include <gtest/gtest.h>

#include "layer_test_util.h"
#include "test_util.h"

namespace parallm::parallel {
namespace {

using testing::random_floats;
using testing::random_matrix;
using testing::rel_error;
using testing::run_tp;

constexpr double kTol = 2e-6;

class TestKv : public KvStore {
 public:
  TestKv(int slots, int64_t capacity, int64_t kv_dim)
      : capacity_(capacity),
        kv_dim_(kv_dim),
        k_(slots * capacity * kv_dim, 0.0f),
        v_(k_.size(), 0.0f) {}
  float* keys(int64_t layer, int slot) override {
    EXPECT_EQ(layer, 3);  // the layer index the test passes through
    return k_.data() + slot * capacity_ * kv_dim_;
  }
  float* values(int64_t layer, int slot) override {
    EXPECT_EQ(layer, 3);
    return v_.data() + slot * capacity_ * kv_dim_;
  }
  int64_t kv_stride() const override { return kv_dim_; }
  int64_t capacity() const override { return capacity_; }
  const std::vector<float>& k() const { return k_; }
  const std::vector<float>& v() const { return v_; }

 private:
  int64_t capacity_, kv_dim_;
  std::vector<float> k_, v_;
};

struct Shape {
  int64_t q_heads, kv_heads, head_dim, hidden;
  kernels::RopeStyle style;
};

struct Weights {
  Tensor q, k, v, o;
};

Weights make_weights(const Shape& s) {
  return {random_matrix(s.q_heads * s.head_dim, s.hidden, 11),
          random_matrix(s.kv_heads * s.head_dim, s.hidden, 12),
          random_matrix(s.kv_heads * s.head_dim, s.hidden, 13),
          random_matrix(s.hidden, s.q_heads * s.head_dim, 14)};
}

ParallelAttention make_layer(const Shape& s, const Weights& w, comm::Group g) {
  const HeadPlan heads = HeadPlan::make(s.q_heads, s.kv_heads, g.size(), g.rank());
  RopeSpec rope;
  for (int64_t i = 0; i < s.head_dim / 2; ++i)
    rope.inv_freq.push_back(std::pow(10000.0f, -2.0f * i / s.head_dim));
  rope.style = s.style;
  const FusedShardSpec spec = ParallelAttention::qkv_spec(heads, s.head_dim);
  const Tensor qkv = testing::fused_rows(spec, [&](const std::string& name) -> const Tensor& {
    return name == "q_proj" ? w.q : name == "k_proj" ? w.k : w.v;
  });
  return ParallelAttention(qkv, testing::cols_of(w.o, ParallelAttention::o_spec(heads, s.head_dim)),
                           heads, s.head_dim, std::move(rope), g);
}

// The steps every rank runs: batches of chunks over two sequences.
const std::vector<std::vector<SeqChunk>> kShortSteps = {
    {{0, 0, 5}, {1, 0, 3}},  // two prompts
    {{0, 5, 1}, {1, 3, 4}},  // a decode token and a chunk that reads the cache
    {{1, 7, 1}},             // one sequence alone
};
const std::vector<std::vector<SeqChunk>> kLongSteps = {{{0, 0, 70}}, {{0, 70, 1}, {1, 0, 2}}};

struct RankRun {
  std::vector<std::vector<float>> outputs;  // per step: [T, hidden]
  std::vector<float> k, v;                  // the cache after the last step
  HeadPlan heads;
};

RankRun run_rank(const Shape& s, const Weights& w, const std::vector<std::vector<SeqChunk>>& steps,
                 comm::Group g) {
  const ParallelAttention layer = make_layer(s, w, g);
  RankRun run;
  run.heads = layer.heads();
  const int64_t capacity = 80;
  TestKv kv(2, capacity, layer.heads().kv_heads * s.head_dim);
  uint32_t seed = 100;
  for (const std::vector<SeqChunk>& chunks : steps) {
    int64_t T = 0;
    std::vector<int32_t> positions;
    for (const SeqChunk& ch : chunks)
      for (int64_t i = 0; i < ch.n_tokens; ++i, ++T)
        positions.push_back(static_cast<int32_t>(ch.start_pos + i));
    const std::vector<float> xn = random_floats(T * s.hidden, seed++);
    std::vector<float> scratch(ParallelAttention::scratch_floats(layer.heads(), s.head_dim, T));
    std::vector<float> out(T * s.hidden, 1e9f);
    layer.forward(xn.data(), chunks, positions.data(), kv, 3, scratch.data(), out.data());
    run.outputs.push_back(std::move(out));
  }
  run.k = kv.k();
  run.v = kv.v();
  return run;
}

void expect_same_as_full(const Shape& s, const std::vector<int>& sizes) {
  const Weights w = make_weights(s);
  for (const auto* steps : {&kShortSteps, &kLongSteps}) {
    RankRun full;
    run_tp(1, [&](comm::Group g) { full = run_rank(s, w, *steps, g); });
    const int64_t kvd_full = s.kv_heads * s.head_dim;
    for (int tp : sizes) {
      std::vector<RankRun> ranks(tp);
      run_tp(tp, [&](comm::Group g) { ranks[g.rank()] = run_rank(s, w, *steps, g); });
      for (int r = 0; r < tp; ++r) {
        const RankRun& got = ranks[r];
        for (size_t i = 0; i < steps->size(); ++i)
          EXPECT_LT(rel_error(got.outputs[i], full.outputs[i]), kTol)
              << "tp " << tp << " rank " << r << " step " << i;
        // Its cache holds the full layer's columns of its KV heads (the same dot products, but the
        // GEMM may block them differently for fewer rows, so not always to the bit).
        const int64_t kvd = got.heads.kv_heads * s.head_dim;
        const int64_t col0 = got.heads.kv_begin * s.head_dim;
        const int64_t rows = static_cast<int64_t>(got.k.size()) / kvd;
        ASSERT_EQ(rows, static_cast<int64_t>(full.k.size()) / kvd_full);
        std::vector<float> want_k, want_v;
        for (int64_t p = 0; p < rows; ++p)
          for (int64_t c = 0; c < kvd; ++c) {
            want_k.push_back(full.k[p * kvd_full + col0 + c]);
            want_v.push_back(full.v[p * kvd_full + col0 + c]);
          }
        EXPECT_LT(rel_error(got.k, want_k), kTol) << "keys, tp " << tp << " rank " << r;
        EXPECT_LT(rel_error(got.v, want_v), kTol) << "values, tp " << tp << " rank " << r;
      }
    }
  }
}

TEST(ParallelAttention, EightQueryHeadsTwoKvHeads) {
  expect_same_as_full({8, 2, 8, 48, kernels::RopeStyle::HalfSplit}, {2, 4, 8});
}

TEST(ParallelAttention, TwelveQueryHeadsSixKvHeadsInterleavedRope) {
  expect_same_as_full({12, 6, 4, 36, kernels::RopeStyle::Interleaved}, {2, 3, 6, 12});
}

TEST(ParallelAttention, QkvSpecNamesTheRowsOfQKAndV) {
  // 8 query heads, 2 KV heads, head_dim 4, TP 4: rank 3 holds query heads 6-7 and KV head 1,
  // which it shares with rank 2.
  const HeadPlan h = HeadPlan::make(8, 2, 4, 3);
  const FusedShardSpec spec = ParallelAttention::qkv_spec(h, 4);
  const FusedShardSpec want{
      {{"q_proj", {32, 24, 32}, 1}, {"k_proj", {8, 4, 8}, 2}, {"v_proj", {8, 4, 8}, 2}}};
  EXPECT_EQ(spec, want);
  EXPECT_EQ(ParallelAttention::o_spec(h, 4), (ShardSpec{32, 24, 32}));
  // TP 2: KV heads split, not replicated.
  EXPECT_EQ(ParallelAttention::qkv_spec(HeadPlan::make(8, 2, 2, 1), 4).part("v_proj"),
            (FusedPart{"v_proj", {8, 4, 8}, 1}));
}

TEST(ParallelAttention, PositionsBeyondTheCacheAreRefused) {
  const Shape s{2, 1, 4, 8, kernels::RopeStyle::HalfSplit};
  const Weights w = make_weights(s);
  const ParallelAttention layer = make_layer(s, w, comm::Group());
  TestKv kv(1, 4, 4);
  std::vector<float> xn(3 * 8), scratch(ParallelAttention::scratch_floats(layer.heads(), 4, 3)),
      out(3 * 8);
  const int32_t pos[] = {2, 3, 4};
  EXPECT_EQ(testing::error_of([&] {
              layer.forward(xn.data(), {{0, 2, 3}}, pos, kv, 3, scratch.data(), out.data());
            }),
            "[attention] sequence 0: positions [2, 5) exceed the KV cache's 4 positions");
}

}  // namespace
}  // namespace parallm::parallel
