// The training ops' backward passes: each fast version against its plain reference (and the
// references against central finite differences in double on a few coordinates), at odd sizes
// and, where the op splits work over the pool, at sizes that do so under a 3-thread pool.
// Attention's forward also matches the inference kernel; the vocab-parallel cross-entropy runs at
// TP 1..4 as threads over an uneven vocabulary split.
#include "parallm/kernels/backward.h"
#include "parallm/parallel/cross_entropy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/attention.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/ops.h"
#include "parallm/parallel/lm_head.h"
#include "parallm/parallel/shard.h"

namespace parallm::kernels {
namespace {

using kernels::RopeStyle;
using kernels::SimdLevel;

// Sets the SIMD level for a scope (the exps of softmax, cross-entropy and SwiGLU have AVX2 and
// scalar paths) and restores the previous one.
class ScopedSimd {
 public:
  explicit ScopedSimd(SimdLevel l) : previous_(kernels::simd_level()) {
    kernels::set_simd_level(l);
  }
  ~ScopedSimd() { kernels::set_simd_level(previous_); }

 private:
  SimdLevel previous_;
};

// Scalar, and the CPU's own level when it has more.
std::vector<SimdLevel> levels() {
  std::vector<SimdLevel> out = {SimdLevel::Scalar};
  if (kernels::cpu_simd_level() != SimdLevel::Scalar) out.push_back(kernels::cpu_simd_level());
  return out;
}

std::vector<float> randn(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(gen);
  return v;
}

// |a - b| <= rtol * |b| + atol, element by element, naming the first few failures.
void expect_close(const std::vector<float>& a, const std::vector<float>& b, double rtol,
                  double atol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double tol = rtol * std::fabs(double{b[i]}) + atol;
    if (!(std::fabs(double{a[i]} - b[i]) <= tol) && ++bad <= 5)
      ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
  }
  EXPECT_EQ(bad, 0) << what;
}

// The largest |x|, to scale absolute tolerances of gradients whose entries can cancel to ~0.
double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(double{x}));
  return m;
}

// Central difference of f at coordinate i of x (a copy in double is perturbed).
double central_diff(const std::function<double(const std::vector<double>&)>& f,
                    const std::vector<float>& x, size_t i, double h = 1e-5) {
  std::vector<double> xd(x.begin(), x.end());
  xd[i] += h;
  const double up = f(xd);
  xd[i] -= 2 * h;
  const double down = f(xd);
  return (up - down) / (2 * h);
}

// ---- linear

void linear_case(int64_t T, int64_t out, int64_t in, const std::string& tag) {
  const auto x = randn(T * in, 1), w = randn(out * in, 2), dy = randn(T * out, 3);
  std::vector<float> y(T * out), y_ref(T * out), dx(T * in), dx_ref(T * in);
  auto dw = randn(out * in, 4);
  std::vector<float> dw_ref = dw;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += double{x[t * in + i]} * w[o * in + i];
      y_ref[t * out + o] = static_cast<float>(s);
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < in; ++i) {
      double s = 0;
      for (int64_t o = 0; o < out; ++o) s += double{dy[t * out + o]} * w[o * in + i];
      dx_ref[t * in + i] = static_cast<float>(s);
    }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      double s = dw_ref[o * in + i];
      for (int64_t t = 0; t < T; ++t) s += double{dy[t * out + o]} * x[t * in + i];
      dw_ref[o * in + i] = static_cast<float>(s);
    }
  const double tol = 1e-5 * std::sqrt(static_cast<double>(std::max({in, out, T})));
  linear_forward(x.data(), w.data(), T, out, in, y.data());
  expect_close(y, y_ref, 1e-5, tol, tag + " y");
  linear_backward_input(dy.data(), w.data(), T, out, in, dx.data());
  expect_close(dx, dx_ref, 1e-5, tol, tag + " dx");
  // accumulate: dx + dy W again
  std::vector<float> dx2 = dx, dx2_ref(dx.size());
  linear_backward_input(dy.data(), w.data(), T, out, in, dx2.data(), true);
  for (size_t i = 0; i < dx2_ref.size(); ++i) dx2_ref[i] = 2 * dx_ref[i];
  expect_close(dx2, dx2_ref, 1e-5, 2 * tol, tag + " dx accumulated");
  linear_backward_weight(dy.data(), x.data(), T, out, in, dw.data());
  expect_close(dw, dw_ref, 1e-5, tol, tag + " dw");
}

TEST(Backward, LinearMatchesLoops) {
  linear_case(7, 6, 13, "small");
}

TEST(Backward, LinearMatchesLoopsSplitOverThePool) {
  for (int threads : {3, 4}) {  // 3: a 1-D split; 4: a 2 x 2 grid where both sides are long
    ThreadPool pool(threads);
    ScopedPool scope(pool);
    const std::string tag = std::to_string(threads) + " threads ";
    linear_case(70, 90, 53, tag + "wide out");
    linear_case(130, 17, 61, tag + "tall T");
    linear_case(5, 300, 211, tag + "few tokens");
  }
}

// ---- embedding

void embedding_case(int64_t T, int64_t D, const std::string& tag) {
  const int64_t rb = 3, re = 9;
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) ids[t] = static_cast<int32_t>((t * 5 + 1) % 12);  // repeats
  const auto dx = randn(T * D, 5);
  auto table = randn((re - rb) * D, 6);
  std::vector<double> want(table.begin(), table.end());
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] >= rb && ids[t] < re)
      for (int64_t d = 0; d < D; ++d) want[(ids[t] - rb) * D + d] += dx[t * D + d];
  embedding_backward(ids.data(), T, dx.data(), D, rb, re, table.data());
  expect_close(table, std::vector<float>(want.begin(), want.end()), 1e-6, 1e-6, tag);
}

TEST(Backward, EmbeddingBackwardAddsRowsInRange) {
  embedding_case(7, 13, "small");
  ThreadPool pool(3);
  ScopedPool scope(pool);
  embedding_case(64, 600, "pool");
}

// ---- RMSNorm

double rmsnorm_loss(const std::vector<double>& x, const std::vector<double>& w,
                    const std::vector<float>& dy, int64_t T, int64_t D, double eps) {
  double loss = 0;
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += x[t * D + i] * x[t * D + i];
    const double r = 1.0 / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) loss += dy[t * D + i] * x[t * D + i] * r * w[i];
  }
  return loss;
}

void rmsnorm_case(int64_t T, int64_t D, bool fd, const std::string& tag) {
  const float eps = 1e-5f;
  const auto x = randn(T * D, 7), w = randn(D, 8), dy = randn(T * D, 9);
  std::vector<float> y(T * D), y_ref(T * D), rstd(T);
  rmsnorm_forward(x.data(), w.data(), T, D, eps, y.data(), rstd.data());
  kernels::rmsnorm_ref(x.data(), w.data(), y_ref.data(), T, D, eps);
  expect_close(y, y_ref, 1e-6, 1e-7, tag + " y");
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double{x[t * D + i]} * x[t * D + i];
    EXPECT_NEAR(rstd[t], 1.0 / std::sqrt(ss / D + eps), 1e-6 * rstd[t]) << tag << " rstd " << t;
  }
  for (bool acc : {false, true}) {
    auto dx = randn(T * D, 10), dw = randn(D, 11);
    auto dx_ref = dx, dw_ref = dw;
    rmsnorm_backward(x.data(), w.data(), rstd.data(), dy.data(), T, D, dx.data(), dw.data(), acc);
    rmsnorm_backward_ref(x.data(), w.data(), eps, dy.data(), T, D, dx_ref.data(), dw_ref.data(),
                         acc);
    expect_close(dx, dx_ref, 1e-5, 1e-6 * max_abs(dx_ref), tag + " dx");
    expect_close(dw, dw_ref, 1e-5, 1e-6 * max_abs(dw_ref), tag + " dw");
  }
  if (!fd) return;
  std::vector<float> dx(T * D), dw(D, 0.0f);
  rmsnorm_backward_ref(x.data(), w.data(), eps, dy.data(), T, D, dx.data(), dw.data(), false);
  const std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end());
  for (size_t i : {size_t{0}, size_t{17}, static_cast<size_t>(T * D - 1)}) {
    const double num = central_diff(
        [&](const std::vector<double>& xp) { return rmsnorm_loss(xp, wd, dy, T, D, eps); }, x, i);
    EXPECT_NEAR(dx[i], num, 1e-4 * (1 + std::fabs(num))) << tag << " dx fd " << i;
  }
  for (size_t i : {size_t{0}, static_cast<size_t>(D / 2), static_cast<size_t>(D - 1)}) {
    const double num = central_diff(
        [&](const std::vector<double>& wp) { return rmsnorm_loss(xd, wp, dy, T, D, eps); }, w, i);
    EXPECT_NEAR(dw[i], num, 1e-4 * (1 + std::fabs(num))) << tag << " dw fd " << i;
  }
}

TEST(Backward, RmsNormForwardAndBackward) {
  rmsnorm_case(7, 13, true, "small");
  ThreadPool pool(3);
  ScopedPool scope(pool);
  rmsnorm_case(40, 1000, false, "pool");
}

// ---- RoPE

void rope_case(RopeStyle style, int64_t T, int64_t heads, int64_t hd, const std::string& tag) {
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>((t * 7 + 3) % 50);
  std::vector<float> inv_freq(static_cast<size_t>(hd / 2));
  for (int64_t i = 0; i < hd / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / hd));
  const auto x = randn(T * heads * hd, 12), dy = randn(T * heads * hd, 13);
  auto dx = dy, dx_ref = dy;
  rope_backward(dx.data(), T, heads, hd, pos.data(), inv_freq.data(), style);
  rope_backward_ref(dx_ref.data(), T, heads, hd, pos.data(), inv_freq.data(), style);
  expect_close(dx, dx_ref, 0, 0, tag + " fast vs ref");
  // The backward is the forward's transpose: <rope(x), dy> == <x, rope_backward(dy)>.
  auto y = x;
  kernels::rope_ref(y.data(), T, heads, hd, pos.data(), inv_freq.data(), style);
  double a = 0, b = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    a += double{y[i]} * dy[i];
    b += double{x[i]} * dx_ref[i];
  }
  EXPECT_NEAR(a, b, 1e-5 * (1 + std::fabs(a))) << tag << " adjoint";
  // and, a rotation, its inverse.
  rope_backward_ref(y.data(), T, heads, hd, pos.data(), inv_freq.data(), style);
  expect_close(y, x, 1e-5, 1e-6, tag + " inverse");
}

TEST(Backward, RopeBackwardBothStyles) {
  for (RopeStyle s : {RopeStyle::Interleaved, RopeStyle::HalfSplit}) {
    const std::string tag = s == RopeStyle::Interleaved ? "interleaved" : "half-split";
    rope_case(s, 7, 6, 4, tag);
    ThreadPool pool(3);
    ScopedPool scope(pool);
    rope_case(s, 40, 8, 128, tag + " pool");
  }
}

// ---- attention

struct AttnSizes {
  int64_t B, S, Hq, Hkv, hd;
};

// sum(dout * attention(q, k, v)) in double: the loss whose gradients attention_backward gives.
double attention_loss(const std::vector<double>& q, const std::vector<double>& k,
                      const std::vector<double>& v, const std::vector<float>& dout,
                      const AttnSizes& z) {
  const int64_t group = z.Hq / z.Hkv, ldq = z.Hq * z.hd, ldk = z.Hkv * z.hd;
  double loss = 0;
  std::vector<double> p(static_cast<size_t>(z.S));
  for (int64_t b = 0; b < z.B; ++b)
    for (int64_t h = 0; h < z.Hq; ++h)
      for (int64_t i = 0; i < z.S; ++i) {
        const int64_t g = h / group;
        double m = -1e300, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t c = 0; c < z.hd; ++c)
            s += q[(b * z.S + i) * ldq + h * z.hd + c] * k[(b * z.S + j) * ldk + g * z.hd + c];
          p[j] = s / std::sqrt(static_cast<double>(z.hd));
          m = std::max(m, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - m));
        for (int64_t c = 0; c < z.hd; ++c) {
          double o = 0;
          for (int64_t j = 0; j <= i; ++j) o += p[j] / sum * v[(b * z.S + j) * ldk + g * z.hd + c];
          loss += o * dout[(b * z.S + i) * ldq + h * z.hd + c];
        }
      }
  return loss;
}

void attention_case(const AttnSizes& z, bool fd, const std::string& tag) {
  const int64_t T = z.B * z.S, ldq = z.Hq * z.hd, ldk = z.Hkv * z.hd;
  const auto q = randn(T * ldq, 14), k = randn(T * ldk, 15), v = randn(T * ldk, 16);
  const auto dout = randn(T * ldq, 17);
  std::vector<float> out(T * ldq), probs(z.B * z.Hq * z.S * z.S, -1.0f);
  attention_forward(q.data(), k.data(), v.data(), z.B, z.S, z.Hq, z.Hkv, z.hd, out.data(),
                    probs.data());
  // The inference kernel, one sequence at a time (its cache is this sequence's k and v).
  std::vector<float> out_kernel(T * ldq);
  const kernels::AttentionShape shape{z.Hq, z.Hkv, z.hd, ldk};
  const float scale = 1.0f / std::sqrt(static_cast<float>(z.hd));
  for (int64_t b = 0; b < z.B; ++b)
    kernels::attention(q.data() + b * z.S * ldq, k.data() + b * z.S * ldk, v.data() + b * z.S * ldk,
                       out_kernel.data() + b * z.S * ldq, z.S, 0, shape, scale);
  expect_close(out, out_kernel, 1e-5, 1e-6, tag + " out vs kernels::attention");
  for (int64_t bh = 0; bh < z.B * z.Hq; ++bh)
    for (int64_t i = 0; i < z.S; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < z.S; ++j) {
        const float p = probs[(bh * z.S + i) * z.S + j];
        if (j > i) {
          ASSERT_EQ(p, 0.0f) << tag << " probs above the diagonal";
        } else {
          ASSERT_GE(p, 0.0f);
        }
        sum += p;
      }
      ASSERT_NEAR(sum, 1.0, 1e-6) << tag << " probs row " << i;
    }
  std::vector<float> dq(T * ldq, 7.0f), dk(T * ldk, 7.0f), dv(T * ldk, 7.0f);
  std::vector<float> dq_ref(T * ldq), dk_ref(T * ldk), dv_ref(T * ldk);
  attention_backward(q.data(), k.data(), v.data(), probs.data(), dout.data(), z.B, z.S, z.Hq, z.Hkv,
                     z.hd, dq.data(), dk.data(), dv.data());
  attention_backward_ref(q.data(), k.data(), v.data(), dout.data(), z.B, z.S, z.Hq, z.Hkv, z.hd,
                         dq_ref.data(), dk_ref.data(), dv_ref.data());
  // Selective recomputation: without probs the forward's output and the backward's gradients
  // (the softmax recomputed block by block from q and k) are bit for bit those with probs kept.
  {
    std::vector<float> out2(T * ldq, 3.0f), dq2(T * ldq, 7.0f), dk2(T * ldk, 7.0f),
        dv2(T * ldk, 7.0f);
    attention_forward(q.data(), k.data(), v.data(), z.B, z.S, z.Hq, z.Hkv, z.hd, out2.data(),
                      nullptr);
    attention_backward(q.data(), k.data(), v.data(), nullptr, dout.data(), z.B, z.S, z.Hq, z.Hkv,
                       z.hd, dq2.data(), dk2.data(), dv2.data());
    EXPECT_EQ(out2, out) << tag << " out without probs";
    EXPECT_EQ(dq2, dq) << tag << " dq with recomputed probs";
    EXPECT_EQ(dk2, dk) << tag << " dk with recomputed probs";
    EXPECT_EQ(dv2, dv) << tag << " dv with recomputed probs";
  }
  expect_close(dq, dq_ref, 1e-5, 2e-6 * max_abs(dq_ref), tag + " dq");
  expect_close(dk, dk_ref, 1e-5, 2e-6 * max_abs(dk_ref), tag + " dk");
  expect_close(dv, dv_ref, 1e-5, 2e-6 * max_abs(dv_ref), tag + " dv");
  if (!fd) return;
  const std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end());
  auto check = [&](const std::vector<float>& x, const std::vector<float>& grad, int which,
                   const char* name) {
    for (size_t i : {size_t{1}, x.size() / 2 + 1, x.size() - 2}) {
      const double num = central_diff(
          [&](const std::vector<double>& xp) {
            return attention_loss(which == 0 ? xp : qd, which == 1 ? xp : kd, which == 2 ? xp : vd,
                                  dout, z);
          },
          x, i);
      EXPECT_NEAR(grad[i], num, 1e-4 * (1 + std::fabs(num))) << tag << " " << name << " fd " << i;
    }
  };
  check(q, dq_ref, 0, "dq");
  check(k, dk_ref, 1, "dk");
  check(v, dv_ref, 2, "dv");
}

TEST(Backward, AttentionForwardAndBackward) {
  for (SimdLevel l : levels()) {
    ScopedSimd simd(l);
    const std::string tag = kernels::simd_name(l) + " ";
    attention_case({2, 5, 6, 2, 4}, l == SimdLevel::Scalar, tag + "small");
    attention_case({1, 3, 2, 2, 4}, false, tag + "mha");
    ThreadPool pool(3);
    ScopedPool scope(pool);
    // S beyond one block of query rows (64), under the pool: a task per (sequence, KV head) ...
    attention_case({2, 70, 4, 2, 8}, false, tag + "pool");
    // ... and, with fewer of those than threads, a task per query head and a sum over groups.
    attention_case({1, 70, 6, 2, 8}, false, tag + "pool, per query head");
  }
}

TEST(Backward, AttentionRejectsBadHeads) {
  std::vector<float> buf(64);
  EXPECT_THROW(
      attention_forward(buf.data(), buf.data(), buf.data(), 1, 2, 3, 2, 4, buf.data(), buf.data()),
      std::invalid_argument);
}

// ---- SwiGLU

TEST(Backward, SwigluBackward) {
  for (int64_t n : {int64_t{13}, int64_t{100003}}) {
    const auto g = randn(n, 18, 3.0f), u = randn(n, 19), dh = randn(n, 20);
    std::vector<float> dg(n), du(n), dg_ref(n), du_ref(n);
    ThreadPool pool(n > 100 ? 3 : 1);
    ScopedPool scope(pool);
    std::vector<float> dg_scalar(n), du_scalar(n);
    {
      ScopedSimd simd(SimdLevel::Scalar);
      swiglu_backward(g.data(), u.data(), dh.data(), n, dg_scalar.data(), du_scalar.data());
    }
    swiglu_backward(g.data(), u.data(), dh.data(), n, dg.data(), du.data());
    for (int64_t i = 0; i < n; ++i) {
      const double s = 1.0 / (1.0 + std::exp(-double{g[i]}));
      du_ref[i] = static_cast<float>(dh[i] * g[i] * s);
      dg_ref[i] = static_cast<float>(dh[i] * u[i] * s * (1 + g[i] * (1 - s)));
    }
    expect_close(dg, dg_ref, 1e-5, 1e-7, "dgate");
    expect_close(du, du_ref, 1e-5, 1e-7, "dup");
    expect_close(dg_scalar, dg_ref, 1e-5, 1e-7, "dgate scalar");
    expect_close(du_scalar, du_ref, 1e-5, 1e-7, "dup scalar");
    if (n > 100) continue;
    // The analytic form against finite differences of silu(g) * u.
    for (int64_t i = 0; i < n; ++i) {
      auto h = [&](const std::vector<double>& p) { return p[0] / (1 + std::exp(-p[0])); };
      const double num = central_diff(h, {g[i]}, 0);
      EXPECT_NEAR(dg[i], dh[i] * u[i] * num, 1e-4 * (1 + std::fabs(dh[i] * u[i] * num)));
    }
  }
}

// ---- cross-entropy

struct CeCase {
  int64_t R = 5, V = 37;
  std::vector<float> logits;
  std::vector<int32_t> targets;
  float grad_scale = 0.25f;
};

CeCase ce_case(int64_t V = 37) {
  CeCase c;
  c.V = V;
  c.logits = randn(c.R * c.V, 21, 4.0f);
  // first, last, and ids owned by different ranks
  for (int32_t t : {0, 36, 17, 9, 28}) c.targets.push_back(static_cast<int32_t>(t % V));
  c.targets[1] = static_cast<int32_t>(V - 1);
  return c;
}

TEST(Backward, CrossEntropyRefMatchesFiniteDifferences) {
  const CeCase c = ce_case();
  std::vector<float> d(c.R * c.V);
  const double loss =
      cross_entropy_ref(c.logits.data(), c.R, c.V, c.targets.data(), c.grad_scale, d.data());
  auto f = [&](const std::vector<double>& x) {
    double l = 0;
    for (int64_t r = 0; r < c.R; ++r) {
      double s = 0;
      for (int64_t j = 0; j < c.V; ++j) s += std::exp(x[r * c.V + j]);
      l += std::log(s) - x[r * c.V + c.targets[r]];
    }
    return l;
  };
  std::vector<double> xd(c.logits.begin(), c.logits.end());
  EXPECT_NEAR(loss, f(xd), 1e-9 * std::fabs(loss));
  for (size_t i : {size_t{0}, size_t{36}, size_t{37 + 36}, size_t{2 * 37 + 17}, size_t{100}}) {
    const double num = c.grad_scale * central_diff(f, c.logits, i);
    EXPECT_NEAR(d[i], num, 1e-6) << "dlogits " << i;
  }
  EXPECT_THROW(
      cross_entropy_ref(c.logits.data(), 1, c.V, std::vector<int32_t>{37}.data(), 1.0f, nullptr),
      std::invalid_argument);
}

void ce_on_ranks(int tp, int64_t V) {
  const CeCase c = ce_case(V);
  std::vector<float> d_ref(c.R * c.V);
  const double loss_ref =
      cross_entropy_ref(c.logits.data(), c.R, c.V, c.targets.data(), c.grad_scale, d_ref.data());
  std::vector<float> d(c.R * c.V, -9.0f);
  std::vector<double> losses(tp);
  std::vector<std::string> errors;
  std::mutex mu;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  comm::launch(tp, lo, [&](comm::Group world) {
    const int r = world.rank();
    const parallel::VocabExchange ex(world);
    const auto shard = parallel::ShardSpec::even(c.V, tp, r);
    const int64_t vl = shard.end - shard.begin;
    std::vector<float> local(c.R * vl), dl(c.R * vl);
    for (int64_t i = 0; i < c.R; ++i)
      for (int64_t j = 0; j < vl; ++j) local[i * vl + j] = c.logits[i * c.V + shard.begin + j];
    const double loss = parallel::cross_entropy(ex, local.data(), c.R, vl, shard.begin, c.targets.data(),
                                      c.grad_scale, dl.data());
    // Without dlogits: the same loss.
    const double loss2 = parallel::cross_entropy(ex, local.data(), c.R, vl, shard.begin, c.targets.data(),
                                       c.grad_scale, nullptr);
    // A target outside the vocabulary throws on every rank, keeping them in step.
    bool threw = false;
    try {
      const std::vector<int32_t> bad = {3, static_cast<int32_t>(c.V), 5, 0, 1};
      parallel::cross_entropy(ex, local.data(), c.R, vl, shard.begin, bad.data(), 1.0f, nullptr);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!threw) errors.push_back("rank " + std::to_string(r) + ": bad target did not throw");
    if (loss != loss2) errors.push_back("rank " + std::to_string(r) + ": loss without dlogits");
    losses[r] = loss;
    for (int64_t i = 0; i < c.R; ++i)
      for (int64_t j = 0; j < vl; ++j) d[i * c.V + shard.begin + j] = dl[i * vl + j];
  });
  for (const auto& e : errors) ADD_FAILURE() << "tp " << tp << ": " << e;
  for (int r = 0; r < tp; ++r) {
    EXPECT_NEAR(losses[r], loss_ref, 1e-6 * std::fabs(loss_ref)) << "tp " << tp << " rank " << r;
    EXPECT_EQ(losses[r], losses[0]) << "tp " << tp << ": ranks disagree";
  }
  expect_close(d, d_ref, 1e-6, 1e-12, "tp " + std::to_string(tp) + " dlogits");
}

TEST(Backward, CrossEntropyVocabParallelMatchesRef) {
  for (int tp : {1, 2, 3, 4}) ce_on_ranks(tp, 37);
  ce_on_ranks(4, 3);  // rank 0's slice of the vocabulary is empty
}

TEST(Backward, CrossEntropySizeOneGroupUnderThePool) {
  // Enough rows for the row split; the default exchange is the size-1 group.
  const int64_t R = 64, V = 1001;
  const auto logits = randn(R * V, 22, 3.0f);
  std::vector<int32_t> targets(R);
  for (int64_t r = 0; r < R; ++r) targets[r] = static_cast<int32_t>((r * 97) % V);
  std::vector<float> d(R * V), d_ref(R * V);
  const double loss_ref =
      cross_entropy_ref(logits.data(), R, V, targets.data(), 1.0f / R, d_ref.data());
  ThreadPool pool(3);
  ScopedPool scope(pool);
  for (SimdLevel l : levels()) {
    ScopedSimd simd(l);
    const double loss = parallel::cross_entropy(parallel::VocabExchange(), logits.data(), R, V, 0,
                                      targets.data(), 1.0f / R, d.data());
    EXPECT_NEAR(loss, loss_ref, 1e-6 * std::fabs(loss_ref)) << kernels::simd_name(l);
    expect_close(d, d_ref, 1e-6, 1e-12, kernels::simd_name(l) + " dlogits");
  }
}

}  // namespace
}  // namespace parallm::kernels
