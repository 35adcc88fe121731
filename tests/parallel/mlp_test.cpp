// ParallelMlp against the unsplit layer (TP 1) on random f32 weights, with an FFN that TP does not
// divide (43 rows), at TP 2, 3, 4, 6 and 8, T = 3 and T = 70. Bound: max |parallel - full| /
// max |full| < 2e-6 on every rank.
#include "parallm/parallel/mlp.h"

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

std::vector<float> run_mlp(const Tensor& gate, const Tensor& up, const Tensor& down,
                           const std::vector<float>& xn, int64_t T, comm::Group g) {
  const ShardSpec ffn = ShardSpec::even(gate.dim(0), g.size(), g.rank());
  const FusedShardSpec spec = ParallelMlp::gate_up_spec(ffn);
  const Tensor gu = testing::fused_rows(spec, [&](const std::string& name) -> const Tensor& {
    return name == "gate_proj" ? gate : up;
  });
  ParallelMlp mlp(gu, testing::cols_of(down, ffn), ffn, g);
  std::vector<float> scratch(ParallelMlp::scratch_floats(ffn, T)), out(T * down.dim(0), 1e9f);
  mlp.forward(xn.data(), T, scratch.data(), out.data());
  return out;
}

TEST(ParallelMlp, EveryTpSizeGivesTheFullOutput) {
  const int64_t hidden = 24, ffn = 43;
  const Tensor gate = random_matrix(ffn, hidden, 21), up = random_matrix(ffn, hidden, 22),
               down = random_matrix(hidden, ffn, 23);
  for (int64_t T : {3, 70}) {
    const std::vector<float> xn = random_floats(T * hidden, 24);
    std::vector<float> want;
    run_tp(1, [&](comm::Group g) { want = run_mlp(gate, up, down, xn, T, g); });
    // The full layer is silu(x gate^T) * (x up^T) down^T, written out here.
    double worst_ref = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> h(ffn);
      for (int64_t f = 0; f < ffn; ++f) {
        double a = 0, b = 0;
        for (int64_t i = 0; i < hidden; ++i) {
          a += double(xn[t * hidden + i]) * gate.data<float>()[f * hidden + i];
          b += double(xn[t * hidden + i]) * up.data<float>()[f * hidden + i];
        }
        h[f] = a / (1 + std::exp(-a)) * b;
      }
      for (int64_t o = 0; o < hidden; ++o) {
        double y = 0;
        for (int64_t f = 0; f < ffn; ++f) y += h[f] * down.data<float>()[o * ffn + f];
        worst_ref = std::max(worst_ref, std::abs(y - want[t * hidden + o]));
      }
    }
    EXPECT_LT(worst_ref, 1e-4) << "T " << T;
    for (int tp : {2, 3, 4, 6, 8}) {
      std::vector<std::vector<float>> got(tp);
      run_tp(tp, [&](comm::Group g) { got[g.rank()] = run_mlp(gate, up, down, xn, T, g); });
      for (int r = 0; r < tp; ++r)
        EXPECT_LT(rel_error(got[r], want), kTol) << "T " << T << " tp " << tp << " rank " << r;
    }
  }
}

TEST(ParallelMlp, GateUpSpecNamesTheRowsOfGateAndUp) {
  const ShardSpec ffn = ShardSpec::even(43, 4, 1);  // rows [10, 21)
  const FusedShardSpec spec = ParallelMlp::gate_up_spec(ffn);
  EXPECT_EQ(spec, (FusedShardSpec{{{"gate_proj", {43, 10, 21}, 1}, {"up_proj", {43, 10, 21}, 1}}}));
  EXPECT_EQ(spec.offset(spec.index("up_proj")), 11);
}

}  // namespace
}  // namespace parallm::parallel
