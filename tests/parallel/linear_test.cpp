// Column- and row-parallel linear layers at TP 1..4, 6 and 8 against the unsplit layer (TP 1), on
// random f32 weights, with dimensions that TP does not divide (uneven shards), at T = 3 (GEMV path)
// and T = 70 (GEMM path). Bound: max |parallel - full| / max |full| < 1e-6 (column-parallel outputs
// are the same dot products; row-parallel ones sum partial products in another order).
#include "parallm/parallel/linear.h"

#include <gtest/gtest.h>

#include <mutex>

#include "layer_test_util.h"
#include "parallm/kernels/quant_matmul.h"
#include "test_util.h"

namespace parallm::parallel {
namespace {

using testing::cols_of;
using testing::random_floats;
using testing::random_matrix;
using testing::rel_error;
using testing::rows_of;
using testing::run_tp;

constexpr double kTol = 1e-6;
const std::vector<int> kSizes = {1, 2, 3, 4, 6, 8};

class LinearTp : public ::testing::TestWithParam<int64_t> {};  // T

TEST_P(LinearTp, ColumnParallelGivesItsColumnsOfTheFullOutput) {
  const int64_t T = GetParam(), in = 40, out = 53;
  const Tensor w = random_matrix(out, in, 1);
  const std::vector<float> x = random_floats(T * in, 2);
  std::vector<float> want(T * out);
  ColumnParallelLinear(w, FusedShardSpec::single("w", ShardSpec::whole(out)), comm::Group())
      .forward(x.data(), T, want.data());
  for (int tp : kSizes) {
    std::vector<float> got(T * out, 1e9f);  // a column no rank wrote fails the bound
    run_tp(tp, [&](comm::Group g) {
      const ShardSpec s = ShardSpec::even(out, tp, g.rank());
      ColumnParallelLinear layer(rows_of(w, s), FusedShardSpec::single("w", s), g);
      std::vector<float> y(T * s.size());
      layer.forward(x.data(), T, y.data());
      // Disjoint columns of `got` per rank.
      for (int64_t t = 0; t < T; ++t)
        std::copy(y.begin() + t * s.size(), y.begin() + (t + 1) * s.size(),
                  got.begin() + t * out + s.begin);
    });
    EXPECT_LT(rel_error(got, want), kTol) << "tp " << tp;
  }
}

// Row blocks of different dtypes (a GGUF's Q4_K q, k and Q6_K v) stay apart: each block's own
// product lands in its columns, bit for bit; blocks of one dtype are fused into one tensor.
TEST_P(LinearTp, ColumnParallelRowBlocksOfMixedDtypesGiveTheirColumns) {
  const int64_t T = GetParam(), in = 64;
  const Tensor a = random_matrix(40, in, 11).to(DType::Q8_0);
  const Tensor b = random_matrix(24, in, 12).to(DType::Q4_0);
  const Tensor c = random_matrix(8, in, 13);
  const std::vector<float> x = random_floats(T * in, 14);
  const FusedShardSpec spec = {
      {{"a", ShardSpec::whole(40)}, {"b", ShardSpec::whole(24)}, {"c", ShardSpec::whole(8)}}};
  const ColumnParallelLinear mixed(std::vector<Tensor>{a, b, c}, spec, comm::Group());
  EXPECT_FALSE(mixed.weight().defined());
  EXPECT_EQ(mixed.blocks().size(), 3u);
  EXPECT_EQ(mixed.out_features(), 72);
  EXPECT_EQ(mixed.in_features(), in);
  EXPECT_EQ(mixed.weight_bytes(), a.nbytes() + b.nbytes() + c.nbytes());
  std::vector<float> y(T * 72, 1e9f);
  mixed.forward(x.data(), T, y.data());
  int64_t col = 0;
  for (const Tensor& w : {a, b, c}) {
    const int64_t n = w.dim(0);
    std::vector<float> want(T * n);
    ColumnParallelLinear(w, FusedShardSpec::single("w", ShardSpec::whole(n)), comm::Group())
        .forward(x.data(), T, want.data());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < n; ++j)
        ASSERT_EQ(y[t * 72 + col + j], want[t * n + j]) << "token " << t << " column " << col + j;
    col += n;
  }
  const ColumnParallelLinear fused(std::vector<Tensor>{b, b},
                                   {{{"b", ShardSpec::whole(24)}, {"b2", ShardSpec::whole(24)}}},
                                   comm::Group());
  EXPECT_TRUE(fused.blocks().empty());
  EXPECT_EQ(fused.weight().dim(0), 48);
  EXPECT_EQ(fused.weight().dtype(), DType::Q4_0);
  try {
    concat_rows({a, b});
    ADD_FAILURE() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("cannot stack"), std::string::npos) << e.what();
  }
  // Repacked rows (groups of 4) are not plain rows: stacking them is refused, not copied.
  const Tensor packed = kernels::repack_quant_weight(b);
  ASSERT_TRUE(kernels::is_repacked(packed));
  EXPECT_THROW(ColumnParallelLinear(std::vector<Tensor>{packed, packed},
                                    {{{"b", ShardSpec::whole(24)}, {"b2", ShardSpec::whole(24)}}},
                                    comm::Group()),
               std::exception);
}

TEST_P(LinearTp, RowParallelGivesTheFullOutputOnEveryRank) {
  const int64_t T = GetParam(), in = 45, out = 38;
  const Tensor w = random_matrix(out, in, 3);
  const std::vector<float> x = random_floats(T * in, 4);
  std::vector<float> want(T * out);
  RowParallelLinear(w, ShardSpec::whole(in), comm::Group()).forward(x.data(), T, want.data());
  for (int tp : kSizes) {
    std::vector<std::vector<float>> got(tp);
    run_tp(tp, [&](comm::Group g) {
      const ShardSpec s = ShardSpec::even(in, tp, g.rank());
      RowParallelLinear layer(cols_of(w, s), s, g);
      // This rank's columns of x: [T, s.size()].
      std::vector<float> xs(T * s.size());
      for (int64_t t = 0; t < T; ++t)
        std::copy(x.begin() + t * in + s.begin, x.begin() + t * in + s.end,
                  xs.begin() + t * s.size());
      std::vector<float> y(T * out);
      layer.forward(xs.data(), T, y.data());
      got[g.rank()] = std::move(y);
    });
    for (int r = 0; r < tp; ++r) {
      EXPECT_LT(rel_error(got[r], want), kTol) << "tp " << tp << " rank " << r;
      EXPECT_EQ(got[r], got[0]) << "ranks disagree, tp " << tp << " rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tokens, LinearTp, ::testing::Values(3, 70),
                         [](const auto& info) { return "T" + std::to_string(info.param); });

TEST(ColumnParallelLinear, FusedWeightRowsComeFromTheNamedParts) {
  // Two tensors fused (as gate/up are): each rank's fused output is its rows of `a`, then its rows
  // of `b`, exactly where the spec's offsets say.
  const int64_t T = 2, in = 16, n = 11;
  const Tensor a = random_matrix(n, in, 5), b = random_matrix(n, in, 6);
  const std::vector<float> x = random_floats(T * in, 7);
  std::vector<float> ya(T * n), yb(T * n);
  ColumnParallelLinear(a, FusedShardSpec::single("a", ShardSpec::whole(n)), comm::Group())
      .forward(x.data(), T, ya.data());
  ColumnParallelLinear(b, FusedShardSpec::single("b", ShardSpec::whole(n)), comm::Group())
      .forward(x.data(), T, yb.data());
  for (int tp : {1, 3, 4}) {
    run_tp(tp, [&](comm::Group g) {
      const ShardSpec s = ShardSpec::even(n, tp, g.rank());
      const FusedShardSpec spec{{{"a", s, 1}, {"b", s, 1}}};
      ASSERT_EQ(spec.size(), 2 * s.size());
      ASSERT_EQ(spec.full(), 2 * n);
      ASSERT_EQ(spec.offset(spec.index("b")), s.size());
      const Tensor w = testing::fused_rows(
          spec, [&](const std::string& name) -> const Tensor& { return name == "a" ? a : b; });
      ColumnParallelLinear layer(w, spec, g);
      std::vector<float> y(T * spec.size());
      layer.forward(x.data(), T, y.data());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < s.size(); ++i) {
          EXPECT_NEAR(y[t * spec.size() + i], ya[t * n + s.begin + i], 1e-6);
          EXPECT_NEAR(y[t * spec.size() + s.size() + i], yb[t * n + s.begin + i], 1e-6);
        }
    });
  }
}

TEST(FusedShardSpec, NamesItsPartsAndRefusesOthers) {
  const FusedShardSpec spec{{{"q_proj", {64, 16, 32}, 1}, {"k_proj", {16, 4, 8}, 2}}};
  EXPECT_EQ(spec.size(), 20);
  EXPECT_EQ(spec.full(), 80);
  EXPECT_EQ(spec.offset(0), 0);
  EXPECT_EQ(spec.offset(1), 16);
  EXPECT_EQ(spec.offset(2), 20);
  EXPECT_EQ(spec.part("k_proj").replicas, 2);
  EXPECT_EQ(testing::error_of([&] { spec.part("v_proj"); }),
            "[parallel] fused weight has no part \"v_proj\" (parts: q_proj, k_proj)");
}

TEST(ParallelLinear, WeightsOfTheWrongShapeAreRefused) {
  const Tensor w = random_matrix(4, 6, 8);
  EXPECT_EQ(testing::error_of([&] {
              ColumnParallelLinear(w, FusedShardSpec::single("w", {10, 0, 5}), comm::Group());
            }),
            "[parallel] column-parallel weight f32[4, 6] does not hold 5 output rows");
  EXPECT_EQ(testing::error_of([&] {
              ColumnParallelLinear(std::vector<Tensor>{w, w.to(DType::BF16)},
                                   FusedShardSpec::single("w", {10, 0, 5}), comm::Group());
            }),
            "[parallel] column-parallel row blocks f32[4, 6], bf16[4, 6] (8 rows) do not hold 5 "
            "output rows");
  EXPECT_EQ(testing::error_of([&] {
              RowParallelLinear(w, {12, 0, 4}, comm::Group());
            }),
            "[parallel] row-parallel weight f32[4, 6] does not hold 4 input columns");
}

}  // namespace
}  // namespace parallm::parallel
