// VocabParallelEmbedding at TP 1..4, 6 and 8 against the full table, with a vocabulary that TP
// does not divide: each row is one rank's row plus zeros from the others, so the result is
// bitwise equal to the unsplit lookup (f32 and bf16 tables).
#include "parallm/parallel/embedding.h"

#include <gtest/gtest.h>

#include "layer_test_util.h"
#include "test_util.h"

namespace parallm::parallel {
namespace {

using testing::rows_of;
using testing::run_tp;

TEST(VocabParallelEmbedding, EveryRankGetsTheFullRowsBitwise) {
  const int64_t vocab = 37, hidden = 12;
  const std::vector<int32_t> ids = {0, 36, 5, 18, 18, 29, 1, 9, 35};
  const int64_t T = static_cast<int64_t>(ids.size());
  for (DType dt : {DType::F32, DType::BF16}) {
    const Tensor table = testing::random_matrix(vocab, hidden, 9).to(dt);
    std::vector<float> want(T * hidden);
    VocabParallelEmbedding(table, ShardSpec::whole(vocab), comm::Group())
        .forward(ids.data(), T, want.data());
    // The unsplit lookup is the table's rows, widened.
    const Tensor f32 = table.to(DType::F32);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < hidden; ++h)
        ASSERT_EQ(want[t * hidden + h], f32.data<float>()[ids[t] * hidden + h]);
    for (int tp : {1, 2, 3, 4, 6, 8}) {
      std::vector<std::vector<float>> got(tp);
      run_tp(tp, [&](comm::Group g) {
        const ShardSpec s = ShardSpec::even(vocab, tp, g.rank());
        VocabParallelEmbedding emb(rows_of(table, s), s, g);
        std::vector<float> x(T * hidden, 1e9f);
        emb.forward(ids.data(), T, x.data());
        got[g.rank()] = std::move(x);
      });
      for (int r = 0; r < tp; ++r)
        EXPECT_EQ(got[r], want) << dtype_name(dt) << " tp " << tp << " rank " << r;
    }
  }
}

TEST(VocabParallelEmbedding, IdsOutsideTheVocabularyAreRefused) {
  const Tensor table = testing::random_matrix(10, 4, 1);
  VocabParallelEmbedding emb(table, ShardSpec::whole(10), comm::Group());
  std::vector<float> x(8);
  const int32_t bad[] = {3, 10};
  EXPECT_EQ(testing::error_of([&] { emb.forward(bad, 2, x.data()); }),
            "[embedding] token id 10 at position 1 is outside the vocabulary [0, 10)");
  EXPECT_EQ(testing::error_of([&] {
              VocabParallelEmbedding(table, {20, 0, 9}, comm::Group());
            }),
            "[parallel] embedding shard f32[10, 4] does not hold 9 vocab rows");
}

}  // namespace
}  // namespace parallm::parallel
