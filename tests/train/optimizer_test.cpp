// The optimizer (train/optimizer.h) against its formulas and two independent references: a plain
// double-precision AdamW written here from the textbook update, and torch.optim.AdamW with
// clip_grad_norm_ (tests/reference/adamw_ref.py on /usr/bin/python3) over 10 steps with warm-up,
// cosine decay, clipping and two parameter groups.
#include "parallm/train/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "parallm/core/thread_pool.h"
#include "test_util.h"

namespace parallm::train {
namespace {

using testing::error_of;

AdamWConfig schedule_config() {
  AdamWConfig c;
  c.lr = 1e-3;
  c.min_lr = 1e-4;
  c.warmup_steps = 4;
  c.steps = 20;
  c.schedule = "cosine";
  return c;
}

TEST(LearningRate, WarmupIsLinearFromLrOverWarmup) {
  const AdamWConfig c = schedule_config();
  for (int64_t k = 0; k < 4; ++k) {
    EXPECT_DOUBLE_EQ(learning_rate(c, k), 1e-3 * static_cast<double>(k + 1) / 4.0) << k;
  }
}

TEST(LearningRate, CosineStartsAtLrEndsAtMinLrAndPassesTheMidpoint) {
  const AdamWConfig c = schedule_config();
  EXPECT_DOUBLE_EQ(learning_rate(c, 4), 1e-3);                  // first step after warm-up
  EXPECT_DOUBLE_EQ(learning_rate(c, 12), 0.5 * (1e-3 + 1e-4));  // (k - 4) / 16 = 1/2
  EXPECT_NEAR(learning_rate(c, 20), 1e-4, 1e-18);               // (k - 4) / 16 = 1
  EXPECT_NEAR(learning_rate(c, 8), 1e-4 + 0.5 * 9e-4 * (1 + std::cos(M_PI * 0.25)), 1e-18);
  // Monotone non-increasing after the warm-up, and clamped at min_lr past the end.
  for (int64_t k = 5; k < 20; ++k) EXPECT_LE(learning_rate(c, k), learning_rate(c, k - 1)) << k;
  EXPECT_NEAR(learning_rate(c, 35), 1e-4, 1e-18);
}

TEST(LearningRate, ConstantAndNoWarmup) {
  AdamWConfig c = schedule_config();
  c.schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(c, 1), 5e-4);
  EXPECT_DOUBLE_EQ(learning_rate(c, 4), 1e-3);
  EXPECT_DOUBLE_EQ(learning_rate(c, 19), 1e-3);
  c.warmup_steps = 0;
  c.schedule = "cosine";
  EXPECT_DOUBLE_EQ(learning_rate(c, 0), 1e-3);
  // A warm-up as long as the run leaves no cosine: min_lr after it.
  c.warmup_steps = 20;
  EXPECT_DOUBLE_EQ(learning_rate(c, 19), 1e-3);
  EXPECT_DOUBLE_EQ(learning_rate(c, 20), 1e-4);
}

TEST(Config, EachBadValueNamesItsFlag) {
  EXPECT_EQ(error_of([] { check_config(AdamWConfig{}); }), "no error");
  auto bad = [](auto edit) {
    AdamWConfig c;
    edit(c);
    return error_of([&] { check_config(c); });
  };
  EXPECT_NE(bad([](AdamWConfig& c) { c.lr = -1; }).find("--lr -1"), std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.min_lr = 1; }).find("--min-lr 1"), std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.warmup_steps = -2; }).find("--warmup-steps -2"),
            std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.steps = 0; }).find("--steps 0"), std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.schedule = "linear"; }).find("--lr-schedule \"linear\""),
            std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.beta1 = 1; }).find("--beta1 1"), std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.beta2 = -0.5; }).find("--beta2 -0.5"), std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.eps = -1; }).find("--eps -1"), std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.weight_decay = -0.1; }).find("--weight-decay -0.1"),
            std::string::npos);
  EXPECT_NE(bad([](AdamWConfig& c) { c.grad_clip = NAN; }).find("--grad-clip nan"),
            std::string::npos);
}

TEST(ClipFactor, TorchSemantics) {
  EXPECT_DOUBLE_EQ(clip_factor(1.0, 0.5), 1.0);
  EXPECT_DOUBLE_EQ(clip_factor(1.0, 4.0), 1.0 / (4.0 + 1e-6));
  EXPECT_DOUBLE_EQ(clip_factor(2.0, 8.0), 2.0 / (8.0 + 1e-6));
  // At the threshold the 1e-6 keeps the factor just below 1, as in torch.
  EXPECT_LT(clip_factor(1.0, 1.0), 1.0);
  EXPECT_DOUBLE_EQ(clip_factor(0.0, 100.0), 1.0);  // clipping off
  EXPECT_TRUE(std::isnan(clip_factor(1.0, NAN)));
}

TEST(SumOfSquares, DoubleAccumulationIndependentOfThreads) {
  const int64_t n = 3 * kNormChunk + 17;
  std::vector<float> x(static_cast<size_t>(n));
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (float& v : x) v = dist(rng);
  double naive = 0;
  for (float v : x) naive += static_cast<double>(v) * v;
  const double one = sum_of_squares(x.data(), n);
  ThreadPool pool(3);
  ScopedPool scoped(pool);
  const double three = sum_of_squares(x.data(), n);
  EXPECT_EQ(one, three);  // bit for bit
  EXPECT_NEAR(one, naive, 1e-12 * naive);
  EXPECT_EQ(sum_of_squares(x.data(), 0), 0.0);
}

// Textbook AdamW (Loshchilov & Hutter, in torch's order) in double, for comparison.
void adamw_double(std::vector<double>& p, const std::vector<double>& g, std::vector<double>& m,
                  std::vector<double>& v, bool decay, const AdamWConfig& c, double lr, int t) {
  for (size_t i = 0; i < p.size(); ++i) {
    if (decay) p[i] -= lr * c.weight_decay * p[i];
    m[i] = c.beta1 * m[i] + (1 - c.beta1) * g[i];
    v[i] = c.beta2 * v[i] + (1 - c.beta2) * g[i] * g[i];
    const double mhat = m[i] / (1 - std::pow(c.beta1, t));
    const double vhat = v[i] / (1 - std::pow(c.beta2, t));
    p[i] -= lr * mhat / (std::sqrt(vhat) + c.eps);
  }
}

double rel_frobenius(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

void check_against_double(bool decay, int threads) {
  ThreadPool pool(threads);
  ScopedPool scoped(pool);
  AdamWConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.1;
  const size_t n = 40000;  // above the threading threshold
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> p(n), m(n, 0.f), v(n, 0.f), g(n);
  for (float& x : p) x = dist(rng);
  std::vector<double> pd(p.begin(), p.end()), md(n, 0.0), vd(n, 0.0);
  for (int t = 1; t <= 5; ++t) {
    for (float& x : g) x = dist(rng);
    const float scale = 0.5f;
    std::vector<double> gd(n);
    for (size_t i = 0; i < n; ++i) gd[i] = static_cast<double>(g[i] * scale);
    adamw_update(p.data(), g.data(), m.data(), v.data(), static_cast<int64_t>(n), decay, c, c.lr, t,
                 scale);
    adamw_double(pd, gd, md, vd, decay, c, c.lr, t);
  }
  const double err = rel_frobenius(p, pd);
  EXPECT_LT(err, 1e-6) << "decay " << decay << ", threads " << threads;
  EXPECT_LT(rel_frobenius(m, md), 1e-6);
  EXPECT_LT(rel_frobenius(v, vd), 1e-6);
}

TEST(AdamW, MatchesPlainDoubleImplementation) {
  check_against_double(true, 1);
  check_against_double(false, 1);
  check_against_double(true, 3);
}

TEST(AdamW, DecayOnlyWhenAskedAndThreadsDoNotChangeBits) {
  AdamWConfig c;
  c.lr = 0.1;
  c.weight_decay = 0.5;
  // Zero gradient: the Adam part is 0/(0+eps) = 0, so only the decay moves p.
  std::vector<float> p(4, 2.f), g(4, 0.f), m(4, 0.f), v(4, 0.f);
  adamw_update(p.data(), g.data(), m.data(), v.data(), 4, true, c, c.lr, 1, 1.f);
  EXPECT_FLOAT_EQ(p[0], 2.f * (1 - 0.1 * 0.5));
  std::fill(p.begin(), p.end(), 2.f);
  adamw_update(p.data(), g.data(), m.data(), v.data(), 4, false, c, c.lr, 1, 1.f);
  EXPECT_EQ(p[0], 2.f);
  // First step with a gradient: the bias-corrected update is lr * sign(g) (for |g| >> eps).
  std::vector<float> p1(1, 0.f), g1(1, -3.f), m1(1, 0.f), v1(1, 0.f);
  adamw_update(p1.data(), g1.data(), m1.data(), v1.data(), 1, false, c, c.lr, 1, 1.f);
  EXPECT_NEAR(p1[0], 0.1, 1e-7);
  EXPECT_NE(error_of([&] {
              adamw_update(p.data(), g.data(), m.data(), v.data(), 4, true, c, 0.1, 0, 1.f);
            }).find("step 0"),
            std::string::npos);

  const int64_t n = 100003;
  std::vector<float> a(n), b, ga(n), ma(n, 0.f), va(n, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    a[i] = std::sin(0.001f * i);
    ga[i] = std::cos(0.003f * i);
  }
  b = a;
  std::vector<float> mb = ma, vb = va;
  adamw_update(a.data(), ga.data(), ma.data(), va.data(), n, true, c, c.lr, 3, 0.7f);
  ThreadPool pool(3);
  ScopedPool scoped(pool);
  adamw_update(b.data(), ga.data(), mb.data(), vb.data(), n, true, c, c.lr, 3, 0.7f);
  EXPECT_EQ(a, b);
  EXPECT_EQ(ma, mb);
  EXPECT_EQ(va, vb);
}

// Ten steps against torch.optim.AdamW + clip_grad_norm_ + the schedule, two parameter groups.
TEST(AdamW, TenStepsMatchTorch) {
  AdamWConfig c;
  c.lr = 2e-2;
  c.min_lr = 2e-3;
  c.warmup_steps = 3;
  c.steps = 10;
  c.schedule = "cosine";
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  c.grad_clip = 1.0;

  struct Param {
    std::vector<float> p, a, m, v;
    std::vector<std::vector<float>> b;  // [step][i]
    bool decay;
  };
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::uniform_real_distribution<float> curv(0.f, 2.f);
  std::vector<Param> params;
  for (auto [n, decay] : std::vector<std::pair<int, bool>>{{96, true}, {16, false}, {64, true}}) {
    Param q;
    q.decay = decay;
    for (int i = 0; i < n; ++i) {
      q.p.push_back(dist(rng));
      q.a.push_back(curv(rng));
    }
    q.m.assign(n, 0.f);
    q.v.assign(n, 0.f);
    // Gradient sizes that put the global norm on both sides of --grad-clip 1.0 over the run.
    for (int k = 0; k < c.steps; ++k) {
      const float s = (k % 3 == 1) ? 0.005f : 0.2f;
      std::vector<float> row(n);
      for (float& x : row) x = s * dist(rng);
      q.b.push_back(row);
    }
    if (n == 96)
      for (float& x : q.a) x *= 0.02f;
    else
      for (float& x : q.a) x *= 0.01f;
    params.push_back(std::move(q));
  }

  nlohmann::json spec;
  spec["config"] = {{"lr", c.lr},
                    {"min_lr", c.min_lr},
                    {"warmup_steps", c.warmup_steps},
                    {"schedule", c.schedule},
                    {"steps", c.steps},
                    {"beta1", c.beta1},
                    {"beta2", c.beta2},
                    {"eps", c.eps},
                    {"weight_decay", c.weight_decay},
                    {"grad_clip", c.grad_clip}};
  for (const Param& q : params) {
    spec["params"].push_back({{"data", q.p}, {"decay", q.decay}, {"a", q.a}, {"b", q.b}});
  }
  testing::TempDir tmp;
  {
    std::ofstream f(tmp.file("in.json"));
    f << spec.dump();
  }
  auto r = testing::run_command("/usr/bin/python3 " PARALLM_SOURCE_DIR
                                "/tests/reference/adamw_ref.py --in " +
                                tmp.file("in.json") + " --out " + tmp.file("out.json"));
  ASSERT_EQ(r.exit_code, 0) << "PyTorch reference failed: " << r.output;
  nlohmann::json ref;
  {
    std::ifstream f(tmp.file("out.json"));
    ref = nlohmann::json::parse(f);
  }

  // Ours: the loop the trainer runs.
  int clipped = 0, unclipped = 0;
  for (int64_t k = 0; k < c.steps; ++k) {
    std::vector<std::vector<float>> grads;
    double sq = 0;
    for (const Param& q : params) {
      std::vector<float> g(q.p.size());
      for (size_t i = 0; i < g.size(); ++i) g[i] = q.a[i] * q.p[i] + q.b[k][i];
      sq += sum_of_squares(g.data(), static_cast<int64_t>(g.size()));
      grads.push_back(std::move(g));
    }
    const double norm = std::sqrt(sq);
    const double lr = learning_rate(c, k);
    const double factor = clip_factor(c.grad_clip, norm);
    (factor < 1 ? clipped : unclipped)++;
    EXPECT_NEAR(lr, ref["lr"][k].get<double>(), 1e-15) << "step " << k;
    EXPECT_NEAR(norm, ref["grad_norm"][k].get<double>(), 1e-6 * norm) << "step " << k;
    for (size_t t = 0; t < params.size(); ++t) {
      Param& q = params[t];
      adamw_update(q.p.data(), grads[t].data(), q.m.data(), q.v.data(),
                   static_cast<int64_t>(q.p.size()), q.decay, c, lr, k + 1,
                   static_cast<float>(factor));
    }
  }
  EXPECT_GT(clipped, 0);
  EXPECT_GT(unclipped, 0);
  double worst = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const auto want = ref["params"][t].get<std::vector<double>>();
    const double err = rel_frobenius(params[t].p, want);
    worst = std::max(worst, err);
    EXPECT_LT(err, 1e-6) << "parameter " << t;
    EXPECT_LT(rel_frobenius(params[t].m, ref["exp_avg"][t].get<std::vector<double>>()), 1e-5);
    EXPECT_LT(rel_frobenius(params[t].v, ref["exp_avg_sq"][t].get<std::vector<double>>()), 1e-5);
  }
  std::printf(
      "10 AdamW steps vs torch.optim.AdamW: worst relative Frobenius error %.3g "
      "(%d steps clipped, %d not)\n",
      worst, clipped, unclipped);
}

}  // namespace
}  // namespace parallm::train
