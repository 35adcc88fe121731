// The mixture-of-experts layer (parallel/moe.h): expert placement, the router, and expert
// parallelism bit for bit equal to one rank (EP 1, 2, 3, 4, 8; with TP 2), degenerate routing
// included (every token to the same experts, ranks without tokens, batch-1 decode); the training
// layer's backward (MoeTrainLayer): router and input gradients against central differences with the
// load-balancing term, and EP 2, 3, 4 (a rank without tokens) and TP 2 against one rank.
#include "parallm/parallel/moe.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "layer_test_util.h"
#include "parallm/comm/mesh.h"
#include "parallm/core/error.h"
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
    double mx = -1e300;
    for (int64_t e = 0; e < kE; ++e) {
      double s = 0;
      for (int64_t h = 0; h < kH; ++h) s += double(xt[h]) * m.router.data<float>()[e * kH + h];
      p[e] = s;
      mx = std::max(mx, s);
    }
    // Unnormalised: the top-k weights below are renormalised over the chosen experts.
    for (double& v : p) v = std::exp(v - mx);
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

// ---- training: MoeTrainLayer's backward ----

// A rank's training view of the full weights: its experts' TP slices, and gradients to match.
struct TrainSlices {
  std::vector<Tensor> w1, w3, w2;
  std::vector<std::vector<float>> g1, g3, g2;
  std::vector<float> grouter;
  MoeTrainWeights w;
  MoeTrainGrads g;
  TrainSlices(const FullMoe& m, const ShardSpec& experts, const ShardSpec& ffn) {
    w.router = m.router.data<float>();
    for (int64_t e = experts.begin; e < experts.end; ++e) {
      w1.push_back(rows_of(m.w1[e], ffn).contiguous());
      w3.push_back(rows_of(m.w3[e], ffn).contiguous());
      w2.push_back(cols_of(m.w2[e], ffn).contiguous());
      g1.emplace_back(w1.back().numel(), 0.0f);
      g3.emplace_back(w3.back().numel(), 0.0f);
      g2.emplace_back(w2.back().numel(), 0.0f);
    }
    grouter.assign(kE * kH, 0.0f);
    g.router = grouter.data();
    for (size_t i = 0; i < w1.size(); ++i) {
      w.w1.push_back(w1[i].data<float>());
      w.w3.push_back(w3[i].data<float>());
      w.w2.push_back(w2[i].data<float>());
      g.w1.push_back(g1[i].data());
      g.w3.push_back(g3[i].data());
      g.w2.push_back(g2[i].data());
    }
  }
};

struct TrainGrads {
  std::vector<float> out, dx, router;  // [T, H], [T, H], [E, H]
  std::vector<std::vector<float>> w1;  // per expert, full [F, H] (TP slices placed)
  std::vector<std::vector<float>> w2;  // per expert, full [H, F]
};

// Forward and backward of `dout` (plus aux_dprob) with EP ranks holding `counts` consecutive
// tokens each, TP `tp`: outputs, input gradients, the router's gradient summed over EP ranks, and
// w1 / w2 gradients of every expert (from its owner).
TrainGrads run_train(const FullMoe& m, const std::vector<float>& x, const std::vector<float>& dout,
                     const std::vector<float>& aux, const std::vector<int64_t>& counts,
                     int tp = 1) {
  const int ep = static_cast<int>(counts.size());
  std::vector<int64_t> begin(ep + 1, 0);
  for (int r = 0; r < ep; ++r) begin[r + 1] = begin[r] + counts[r];
  const int64_t T = begin[ep];
  TrainGrads o;
  o.out.assign(T * kH, NAN);
  o.dx.assign(T * kH, NAN);
  o.router.assign(kE * kH, 0.0f);
  o.w1.assign(kE, std::vector<float>(kF * kH, 0.0f));
  o.w2.assign(kE, std::vector<float>(kH * kF, 0.0f));
  std::vector<std::vector<float>> routers(ep);
  std::mutex mu;
  testing::run_tp(ep * tp, [&](comm::Group world) {
    comm::Mesh mesh(world, {tp, 1, ep, ep});
    const ShardSpec experts = expert_range(kE, ep, mesh.ep_rank());
    const ShardSpec ffn = ShardSpec::even(kF, tp, mesh.tp_rank());
    TrainSlices sl(m, experts, ffn);
    MoeTrainLayer layer(kE, kH, kTopK, true, experts, ffn, mesh.ep(), mesh.tp());
    const int r = mesh.ep_rank();
    const int64_t n = counts[r];
    MoeCache cache;
    std::vector<float> out(std::max<int64_t>(n, 1) * kH), dx(out.size());
    layer.forward(sl.w, x.data() + begin[r] * kH, n, cache, out.data());
    layer.backward(sl.w, x.data() + begin[r] * kH, cache, dout.data() + begin[r] * kH, n,
                   aux.empty() ? nullptr : aux.data(), dx.data(), sl.g);
    std::lock_guard<std::mutex> lock(mu);
    if (mesh.tp_rank() == 0) {
      std::memcpy(o.out.data() + begin[r] * kH, out.data(), n * kH * sizeof(float));
      std::memcpy(o.dx.data() + begin[r] * kH, dx.data(), n * kH * sizeof(float));
      routers[r] = sl.grouter;
    }
    for (int64_t e = experts.begin; e < experts.end; ++e) {
      const size_t i = static_cast<size_t>(e - experts.begin);
      for (int64_t f = ffn.begin; f < ffn.end; ++f)
        for (int64_t h = 0; h < kH; ++h) {
          o.w1[e][f * kH + h] = sl.g1[i][(f - ffn.begin) * kH + h];
          o.w2[e][h * kF + f] = sl.g2[i][h * ffn.size() + (f - ffn.begin)];
        }
    }
  });
  for (int r = 0; r < ep; ++r)  // the router is replicated: the rank's gradients add up
    for (int64_t i = 0; i < kE * kH; ++i) o.router[i] += routers[r][i];
  return o;
}

// ---- MoeMode::AllReduce (vLLM's --enable-expert-parallel layout) ----

// A layer shape: mixtral-tiny's routing (top-2, renormalised) and qwen2-moe-tiny's (top-2, the
// softmax's weights as they are, narrower experts), hidden cut to keep the test fast.
struct MoeShape {
  const char* name;
  int64_t H, F, E;
  int k;
  bool renormalize;
};
constexpr MoeShape kMixtral{"mixtral", 32, 96, 8, 2, true};
constexpr MoeShape kQwen2Moe{"qwen2_moe", 32, 48, 8, 2, false};
// Top-3: with three slots a token's sum depends on their order (two add the same either way).
constexpr MoeShape kTop3{"mixtral top-3", 32, 96, 8, 3, true};

struct ShapedMoe {
  MoeShape s;
  Tensor router;
  std::vector<Tensor> w13, w2;  // whole experts, w1 rows then w3 rows
};

ShapedMoe make_shaped(const MoeShape& s, uint32_t seed) {
  ShapedMoe m{s, random_matrix(s.E, s.H, seed, 0.8f), {}, {}};
  for (int64_t e = 0; e < s.E; ++e) {
    m.w13.push_back(random_matrix(2 * s.F, s.H, seed + 10 + 2 * e));
    m.w2.push_back(random_matrix(s.H, s.F, seed + 11 + 2 * e));
  }
  return m;
}

// Rank `ep.rank()`'s layer: its whole experts (expert_range), no TP inside.
MoeLayer shaped_layer(const ShapedMoe& m, const comm::Group& ep, MoeMode mode) {
  const ShardSpec experts = expert_range(m.s.E, ep.size(), ep.rank());
  std::vector<Tensor> w13, w2;
  for (int64_t e = experts.begin; e < experts.end; ++e) {
    w13.push_back(m.w13[e].contiguous());
    w2.push_back(m.w2[e].contiguous());
  }
  return MoeLayer(m.router.contiguous(), w13, w2, m.s.k, experts, ShardSpec::even(m.s.F, 1, 0),
                  ep, comm::Group(), m.s.renormalize, mode);
}

// The AllReduce layer on `P` ranks holding the same T tokens: every rank's output (they must all be
// the same), and the rows each expert multiplied (summed over ranks).
struct AllReduceRun {
  std::vector<std::vector<float>> out;  // per rank
  std::vector<int64_t> expert_rows;
};
AllReduceRun run_all_reduce(const ShapedMoe& m, const std::vector<float>& x, int64_t T, int P) {
  AllReduceRun run;
  run.out.assign(P, std::vector<float>(T * m.s.H, NAN));
  run.expert_rows.assign(m.s.E, 0);
  std::mutex mu;
  testing::run_tp(P, [&](comm::Group g) {
    MoeLayer layer = shaped_layer(m, g, MoeMode::AllReduce);
    layer.forward(x.data(), T, run.out[g.rank()].data());
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < layer.expert_rows().size(); ++i)
      run.expert_rows[layer.experts().begin + static_cast<int64_t>(i)] += layer.expert_rows()[i];
  });
  return run;
}

// EP 1 in the existing (dispatch) mode: the reference the new layout must equal bit for bit.
std::vector<float> run_dispatch_one(const ShapedMoe& m, const std::vector<float>& x, int64_t T) {
  std::vector<float> out(T * m.s.H, NAN);
  MoeLayer layer = shaped_layer(m, comm::Group(), MoeMode::Dispatch);
  layer.forward(x.data(), T, out.data());
  return out;
}

TEST(MoeLayerAllReduce, EveryRankCountIsEpOneBitForBit) {
  for (const MoeShape& shape : {kMixtral, kQwen2Moe, kTop3}) {
    const ShapedMoe m = make_shaped(shape, 31);
    for (int64_t T : {int64_t{1}, int64_t{2}, int64_t{13}}) {  // T = 1: batch-1 decode
      const std::vector<float> x = random_floats(T * shape.H, 32 + static_cast<uint32_t>(T));
      const std::vector<float> one = run_dispatch_one(m, x, T);
      for (int P : {1, 2, 3, 4}) {  // 8 experts over 3: 3, 3, 2 (uneven)
        const AllReduceRun run = run_all_reduce(m, x, T, P);
        for (int r = 0; r < P; ++r)
          EXPECT_TRUE(same_bits(run.out[r], one))
              << shape.name << " T " << T << " ranks " << P << " rank " << r;
        int64_t rows = 0;
        for (int64_t v : run.expert_rows) rows += v;
        EXPECT_EQ(rows, T * shape.k) << shape.name << " T " << T << " ranks " << P;
      }
    }
  }
}

TEST(MoeLayerAllReduce, RanksWithoutRoutedRows) {
  // Router rows 0 and 1 rank above the others for every positive input: every token picks experts
  // 0 and 1, all on rank 0 at 2, 3 or 4 ranks; the other ranks contribute only zeros.
  for (const MoeShape& shape : {kMixtral, kQwen2Moe}) {
    ShapedMoe m = make_shaped(shape, 41);
    for (int64_t e = 0; e < shape.E; ++e)
      for (int64_t h = 0; h < shape.H; ++h)
        m.router.data<float>()[e * shape.H + h] = e == 0 ? 0.3f : e == 1 ? 0.2f : -0.1f * float(e);
    const int64_t T = 5;
    std::vector<float> x = random_floats(T * shape.H, 42);
    for (float& v : x) v = std::abs(v) + 0.1f;
    const std::vector<float> one = run_dispatch_one(m, x, T);
    for (int P : {2, 3, 4}) {
      const AllReduceRun run = run_all_reduce(m, x, T, P);
      for (int r = 0; r < P; ++r) EXPECT_TRUE(same_bits(run.out[r], one)) << shape.name << P;
      EXPECT_EQ(run.expert_rows[0], T);
      EXPECT_EQ(run.expert_rows[1], T);
    }
  }
}

TEST(MoeLayerAllReduce, SplitExpertsRefused) {
  // The layout holds whole experts: a TP group inside it is a mistake, one line.
  const ShapedMoe m = make_shaped(kMixtral, 51);
  std::string err;
  std::mutex mu;
  testing::run_tp(2, [&](comm::Group g) {
    const ShardSpec ffn = ShardSpec::even(kMixtral.F, 2, g.rank());
    std::vector<Tensor> w13, w2;
    for (int64_t e = 0; e < kMixtral.E; ++e) {
      w13.push_back(Tensor::empty(DType::F32, {2 * ffn.size(), kMixtral.H}));
      w2.push_back(Tensor::empty(DType::F32, {kMixtral.H, ffn.size()}));
    }
    const std::string e = testing::error_of([&] {
      MoeLayer(m.router.contiguous(), w13, w2, 2, ShardSpec::even(kMixtral.E, 1, 0), ffn,
               comm::Group(), g, true, MoeMode::AllReduce);
    });
    std::lock_guard<std::mutex> lock(mu);
    err = e;
  });
  EXPECT_EQ(err,
            "[moe] the all-reduce expert layout holds whole experts: its TP group must be size 1, "
            "got 2");
}

TEST(MoeTrainLayer, RouterAndInputGradientsMatchFiniteDifferences) {
  // L = sum(dout * out) + sum_{t,e} aux[e] p_te. Central differences in f32 on the router and the
  // input, skipping the few entries whose step flips a token's top-3 (L jumps there).
  const FullMoe m = make_moe(41);
  const int64_t T = 6;
  const std::vector<float> x = random_floats(T * kH, 42), dout = random_floats(T * kH, 43);
  std::vector<float> aux(kE);
  for (int64_t e = 0; e < kE; ++e) aux[e] = 0.05f * float(e + 1);
  const TrainGrads g = run_train(m, x, dout, aux, {T});
  const float eps = 1e-2f;
  std::vector<int32_t> chosen;  // the last loss() call's routing
  auto loss = [&](const FullMoe& mm, const std::vector<float>& xx) {
    MoeTrainLayer layer(kE, kH, kTopK, true, ShardSpec{kE, 0, kE}, ShardSpec{kF, 0, kF},
                        comm::Group(), comm::Group());
    TrainSlices sl(mm, ShardSpec{kE, 0, kE}, ShardSpec{kF, 0, kF});
    MoeCache c;
    std::vector<float> out(T * kH);
    layer.forward(sl.w, xx.data(), T, c, out.data());
    double l = 0;
    for (int64_t i = 0; i < T * kH; ++i) l += double(dout[i]) * out[i];
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < kE; ++e) l += double(aux[e]) * c.probs[t * kE + e];
    chosen = c.experts;
    return l;
  };
  loss(m, x);
  const std::vector<int32_t> base = chosen;
  int skipped = 0;
  // Central difference of loss(plus) - loss(minus), or NAN when either flips the routing.
  auto central = [&](double lp, const std::vector<int32_t>& rp, double lm) {
    if (rp != base || chosen != base) return ++skipped, double(NAN);
    return (lp - lm) / (2.0 * eps);
  };
  double num = 0, den = 0;
  for (int64_t i = 0; i < kE * kH; i += 7) {
    FullMoe a = m, b = m;
    for (FullMoe* f : {&a, &b}) {  // own copies of the router (a Tensor copy may share storage)
      f->router = Tensor::empty(DType::F32, {kE, kH});
      std::memcpy(f->router.data<float>(), m.router.data<float>(), kE * kH * sizeof(float));
    }
    a.router.data<float>()[i] += eps;
    b.router.data<float>()[i] -= eps;
    const double lp = loss(a, x);
    const std::vector<int32_t> rp = chosen;
    const double fd = central(lp, rp, loss(b, x));
    if (std::isnan(fd)) continue;
    num += (fd - g.router[i]) * (fd - g.router[i]);
    den += fd * fd;
  }
  std::printf("router gradient vs central differences: relative %.3g\n", std::sqrt(num / den));
  EXPECT_LT(std::sqrt(num / den), 2e-3);
  num = den = 0;
  for (int64_t i = 0; i < T * kH; i += 5) {
    std::vector<float> a = x, b = x;
    a[i] += eps, b[i] -= eps;
    const double lp = loss(m, a);
    const std::vector<int32_t> rp = chosen;
    const double fd = central(lp, rp, loss(m, b));
    if (std::isnan(fd)) continue;
    num += (fd - g.dx[i]) * (fd - g.dx[i]);
    den += fd * fd;
  }
  std::printf(
      "input gradient vs central differences: relative %.3g (%d entries skipped: routing "
      "flips)\n",
      std::sqrt(num / den), skipped);
  EXPECT_LT(std::sqrt(num / den), 2e-3);
  EXPECT_LE(skipped, 8) << "too many routing flips for a meaningful check";
  // Without the aux term the router's gradient changes (the term is not silently dropped).
  const TrainGrads plain = run_train(m, x, dout, {}, {T});
  EXPECT_GT(testing::rel_error(plain.router, g.router), 1e-2);
}

TEST(MoeTrainLayer, ExpertParallelBackwardMatchesOneRank) {
  const FullMoe m = make_moe(51);
  const int64_t T = 11;
  const std::vector<float> x = random_floats(T * kH, 52), dout = random_floats(T * kH, 53);
  std::vector<float> aux(kE, 0.01f);
  const TrainGrads one = run_train(m, x, dout, aux, {T});
  for (const auto& [counts, tp] : std::vector<std::pair<std::vector<int64_t>, int>>{
           {{5, 6}, 1}, {{4, 0, 7}, 1}, {{3, 3, 0, 5}, 1}, {{6, 5}, 2}, {{T}, 2}}) {
    const TrainGrads g = run_train(m, x, dout, aux, counts, tp);
    const std::string what = cat("EP ", counts.size(), " TP ", tp);
    EXPECT_LT(testing::rel_error(g.out, one.out), 1e-6) << what;
    EXPECT_LT(testing::rel_error(g.dx, one.dx), 1e-5) << what;
    EXPECT_LT(testing::rel_error(g.router, one.router), 1e-5) << what;
    for (int64_t e = 0; e < kE; ++e) {
      EXPECT_LT(testing::rel_error(g.w1[e], one.w1[e]), 1e-5) << what << " expert " << e;
      EXPECT_LT(testing::rel_error(g.w2[e], one.w2[e]), 1e-5) << what << " expert " << e;
    }
  }
}

}  // namespace
}  // namespace parallm::parallel
