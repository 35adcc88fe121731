// The mixture-of-experts layer (parallel/moe.h): expert placement, the router, and expert
// parallelism bit for bit equal to one rank (EP 1, 2, 3, 4, 8; with TP 2), degenerate routing
// included (every token to the same experts, ranks without tokens, batch-1 decode).
#include "parallm/parallel/moe.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "layer_test_util.h"
#include "parallm/comm/mesh.h"
#include "parallm/kernels/ops.h"
#include "test_util.h"

namespace parallm::parallel {
namespace {

using testing::cols_of;
using testing::random_floats;
using testing::random_matrix;
using testing::rows_of;

constexpr int64_t kH = 24, kF = 20, kE = 8;
// Top-3: with three rows a token's sum depends on their order (two rows add the same either way).
constexpr int kTopK = 3;

struct FullMoe {
  Tensor router;               // [E, H]
  std::vector<Tensor> w1, w3;  // [F, H]
  std::vector<Tensor> w2;      // [H, F]
};

FullMoe make_moe(uint32_t seed) {
  FullMoe m;
  m.router = random_matrix(kE, kH, seed, 0.8f);
  for (int64_t e = 0; e < kE; ++e) {
    m.w1.push_back(random_matrix(kF, kH, seed + 10 + 3 * e));
    m.w3.push_back(random_matrix(kF, kH, seed + 11 + 3 * e));
    m.w2.push_back(random_matrix(kH, kF, seed + 12 + 3 * e));
  }
  return m;
}

// The rank's layer: its experts, each its TP slice.
MoeLayer rank_layer(const FullMoe& m, const comm::Group& ep, const comm::Group& tp) {
  const ShardSpec experts = expert_range(kE, ep.size(), ep.rank());
  const ShardSpec ffn = ShardSpec::even(kF, tp.size(), tp.rank());
  std::vector<Tensor> w13, w2;
  for (int64_t e = experts.begin; e < experts.end; ++e) {
    Tensor a = rows_of(m.w1[e], ffn), b = rows_of(m.w3[e], ffn);
    Tensor both = Tensor::empty(DType::F32, {2 * ffn.size(), kH});
    std::memcpy(both.data<float>(), a.data<float>(), a.nbytes());
    std::memcpy(both.data<float>() + a.numel(), b.data<float>(), b.nbytes());
    w13.push_back(both);
    w2.push_back(cols_of(m.w2[e], ffn));
  }
  return MoeLayer(m.router.contiguous(), w13, w2, kTopK, experts, ffn, ep, tp);
}

// The formulas in double: softmax, top-k, renormalise, weighted SwiGLU experts.
std::vector<float> reference(const FullMoe& m, const std::vector<float>& x, int64_t T) {
  std::vector<float> out(T * kH);
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = &x[t * kH];
    std::vector<double> p(kE);
    double mx = -1e300, sum = 0;
    for (int64_t e = 0; e < kE; ++e) {
      double s = 0;
      for (int64_t h = 0; h < kH; ++h) s += double(xt[h]) * m.router.data<float>()[e * kH + h];
      p[e] = s;
      mx = std::max(mx, s);
    }
    for (double& v : p) sum += (v = std::exp(v - mx));
    std::vector<int> order(kE);
    for (int e = 0; e < kE; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double chosen = 0;
    for (int j = 0; j < kTopK; ++j) chosen += p[order[j]];
    for (int j = 0; j < kTopK; ++j) {
      const int e = order[j];
      const double w = p[e] / chosen;
      std::vector<double> a(kF);
      for (int64_t f = 0; f < kF; ++f) {
        double g = 0, u = 0;
        for (int64_t h = 0; h < kH; ++h) {
          g += double(xt[h]) * m.w1[e].data<float>()[f * kH + h];
          u += double(xt[h]) * m.w3[e].data<float>()[f * kH + h];
        }
        a[f] = g / (1 + std::exp(-g)) * u;
      }
      for (int64_t h = 0; h < kH; ++h) {
        double y = 0;
        for (int64_t f = 0; f < kF; ++f) y += a[f] * m.w2[e].data<float>()[h * kF + f];
        out[t * kH + h] += static_cast<float>(w * y);
      }
    }
  }
  return out;
}

// Each EP rank's tokens: `counts[r]` consecutive rows of x. Returns the outputs concatenated.
std::vector<float> run_ep(const FullMoe& m, const std::vector<float>& x,
                          const std::vector<int64_t>& counts, int tp = 1) {
  const int ep = static_cast<int>(counts.size());
  std::vector<int64_t> begin(ep + 1, 0);
  for (int r = 0; r < ep; ++r) begin[r + 1] = begin[r] + counts[r];
  std::vector<float> out(begin[ep] * kH, NAN);
  testing::run_tp(ep * tp, [&](comm::Group world) {
    comm::Mesh mesh(world, {tp, 1, ep, ep});
    MoeLayer layer = rank_layer(m, mesh.ep(), mesh.tp());
    const int r = mesh.ep_rank();
    std::vector<float> mine(std::max<int64_t>(counts[r], 1) * kH);
    layer.forward_tokens(x.data() + begin[r] * kH, counts[r], mine.data());
    if (mesh.tp_rank() == 0)
      std::memcpy(out.data() + begin[r] * kH, mine.data(), counts[r] * kH * sizeof(float));
  });
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(ExpertRange, ContiguousFirstRanksTakeTheRemainder) {
  // 8 experts over 3 ranks: 3, 3, 2.
  EXPECT_EQ(expert_range(8, 3, 0), (ShardSpec{8, 0, 3}));
  EXPECT_EQ(expert_range(8, 3, 1), (ShardSpec{8, 3, 6}));
  EXPECT_EQ(expert_range(8, 3, 2), (ShardSpec{8, 6, 8}));
  for (int ep : {1, 2, 3, 4, 5, 7, 8})
    for (int64_t e = 0; e < 8; ++e) {
      const ShardSpec r = expert_range(8, ep, expert_owner(e, 8, ep));
      EXPECT_TRUE(e >= r.begin && e < r.end) << "expert " << e << " ep " << ep;
    }
  EXPECT_EQ(testing::error_of([] { expert_range(8, 9, 0); }),
            "[moe] --ep 9 exceeds the model's 8 experts (each expert-parallel rank needs at least "
            "one expert)");
  EXPECT_EQ(testing::error_of([] { expert_range(0, 2, 0); }),
            "[moe] --ep 2 needs a mixture-of-experts model (this one is dense)");
}

TEST(MoeRoute, TopKRenormalisedAndTopKAboveExpertsRefused) {
  const FullMoe m = make_moe(3);
  const std::vector<float> x = random_floats(5 * kH, 4);
  std::vector<int32_t> ex(5 * kTopK);
  std::vector<float> w(5 * kTopK);
  moe_route(x.data(), 5, m.router.data<float>(), kE, kH, kTopK, true, ex.data(), w.data());
  for (int t = 0; t < 5; ++t) {
    const float* wt = &w[t * kTopK];
    const int32_t* et = &ex[t * kTopK];
    EXPECT_NEAR(wt[0] + wt[1] + wt[2], 1.0f, 1e-6);
    EXPECT_GE(wt[0], wt[1]);
    EXPECT_GE(wt[1], wt[2]);
    EXPECT_TRUE(et[0] != et[1] && et[1] != et[2] && et[0] != et[2]);
  }
  EXPECT_EQ(testing::error_of([&] {
              moe_route(x.data(), 5, m.router.data<float>(), kE, kH, 9, true, ex.data(), w.data());
            }),
            "[moe] top-k 9 must be in 1..8 (the number of experts)");
}

TEST(MoeLayerEp, MatchesTheFormulasAndEveryEpIsBitForBitEpOne) {
  const FullMoe m = make_moe(7);
  const int64_t T = 13;
  const std::vector<float> x = random_floats(T * kH, 8);
  const std::vector<float> one = run_ep(m, x, {T});
  EXPECT_LT(testing::rel_error(one, reference(m, x, T)), 1e-5);
  // Uneven token counts, and ranks with none.
  for (const std::vector<int64_t>& counts : std::vector<std::vector<int64_t>>{
           {6, 7}, {5, 0, 8}, {13, 0, 0}, {3, 4, 0, 6}, {1, 2, 0, 3, 2, 1, 4, 0}})
    EXPECT_TRUE(same_bits(run_ep(m, x, counts), one)) << "EP " << counts.size();
  // TP 2 inside each EP rank: the experts' FFN split too. Equal to TP 2 at EP 1 bit for bit.
  const std::vector<float> tp2 = run_ep(m, x, {T}, 2);
  EXPECT_LT(testing::rel_error(tp2, one), 1e-5);
  EXPECT_TRUE(same_bits(run_ep(m, x, {7, 6}, 2), tp2));
}

TEST(MoeLayerEp, EveryTokenToTheSameExperts) {
  // Router rows 0, 1, 2 rank above the others for every positive input: all tokens pick experts
  // 0, 1 and 2 (rank 0's at EP 2), the other ranks' experts get nothing.
  FullMoe m = make_moe(21);
  for (int64_t e = 0; e < kE; ++e)
    for (int64_t h = 0; h < kH; ++h)
      m.router.data<float>()[e * kH + h] = e == 0   ? 0.3f
                                           : e == 1 ? 0.2f
                                           : e == 2 ? 0.1f
                                                    : -0.1f * float(e);
  const int64_t T = 9;
  std::vector<float> x = random_floats(T * kH, 22);
  for (float& v : x) v = std::abs(v) + 0.1f;
  const std::vector<float> one = run_ep(m, x, {T});
  EXPECT_LT(testing::rel_error(one, reference(m, x, T)), 1e-5);
  EXPECT_TRUE(same_bits(run_ep(m, x, {4, 5}), one));
  EXPECT_TRUE(same_bits(run_ep(m, x, {0, 0, 9, 0}), one));
}

TEST(MoeLayerEp, ReplicatedForwardIsEpOneBitForBitAtBatchOneAndMore) {
  // The engine's forward(): every rank holds all the tokens; T = 1 leaves all ranks but one idle.
  const FullMoe m = make_moe(31);
  for (int64_t T : {1, 2, 7}) {
    const std::vector<float> x = random_floats(T * kH, 32 + T);
    std::vector<float> one(T * kH);
    testing::run_tp(1, [&](comm::Group g) {
      rank_layer(m, g, comm::Group()).forward(x.data(), T, one.data());
    });
    for (int ep : {2, 3, 4}) {
      std::vector<std::vector<float>> outs(ep, std::vector<float>(T * kH));
      testing::run_tp(ep, [&](comm::Group g) {
        rank_layer(m, g, comm::Group()).forward(x.data(), T, outs[g.rank()].data());
      });
      for (int r = 0; r < ep; ++r)
        EXPECT_TRUE(same_bits(outs[r], one)) << "T " << T << " EP " << ep << " rank " << r;
    }
  }
}

}  // namespace
}  // namespace parallm::parallel
