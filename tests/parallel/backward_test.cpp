// The layers' backward passes (training) against plain loops over the full tensors: column- and
// row-parallel linear, the LM head and the embedding, at TP sizes that split unevenly, and the
// fused Q/K/V layer whose K/V rows TP replicates (their gradient is the sum over the replicas).
#include <gtest/gtest.h>

#include <vector>

#include "parallel/layer_test_util.h"
#include "parallm/parallel/attention.h"
#include "parallm/parallel/embedding.h"
#include "parallm/parallel/linear.h"
#include "parallm/parallel/lm_head.h"

namespace parallm::parallel {
namespace {

using testing::random_floats;
using testing::random_matrix;
using testing::rel_error;
using testing::run_tp;

// a [M, K] . b [K, N] with a and b read through strides (plain loops, double accumulation).
std::vector<float> matmul(const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs,
                          int64_t b_cs, int64_t M, int64_t K, int64_t N) {
  std::vector<float> out(static_cast<size_t>(M * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(a[i * a_rs + k * a_cs]) * b[k * b_rs + j * b_cs];
      out[i * N + j] = static_cast<float>(s);
    }
  return out;
}

std::vector<float> rows(const std::vector<float>& m, int64_t cols, int64_t b, int64_t e) {
  return {m.begin() + b * cols, m.begin() + e * cols};
}
std::vector<float> cols(const std::vector<float>& m, int64_t n, int64_t b, int64_t e) {
  std::vector<float> out;
  for (size_t r = 0; r < m.size() / n; ++r)
    out.insert(out.end(), m.begin() + r * n + b, m.begin() + r * n + e);
  return out;
}

TEST(ParallelBackward, FusedQkvWithReplicatedKvHeads) {
  const int64_t T = 5, K = 6, hd = 2, q_heads = 8, kv_heads = 2;
  const Tensor wq = random_matrix(q_heads * hd, K, 1), wk = random_matrix(kv_heads * hd, K, 2),
               wv = random_matrix(kv_heads * hd, K, 3);
  const std::vector<float> x = random_floats(T * K, 4);
  for (int tp : {1, 2, 4}) {
    // Every rank's output gradient, drawn alike on all ranks so each can form the expectation.
    std::vector<FusedShardSpec> specs;
    std::vector<std::vector<float>> dys;
    for (int r = 0; r < tp; ++r) {
      specs.push_back(ParallelAttention::qkv_spec(HeadPlan::make(q_heads, kv_heads, tp, r), hd));
      dys.push_back(random_floats(T * specs.back().size(), 10 + r));
    }
    run_tp(tp, [&](comm::Group g) {
      const int r = g.rank();
      auto full_of = [&](const std::string& n) -> const Tensor& {
        return n == "q_proj" ? wq : n == "k_proj" ? wk : wv;
      };
      const Tensor w = testing::fused_rows(specs[r], full_of);
      const ColumnParallelLinear layer(w, specs[r], g);
      std::vector<float> dx(T * K), dw(w.numel(), 1.0f);  // dw accumulates onto 1
      layer.backward(x.data(), dys[r].data(), T, dx.data(), dw.data());
      // dx: the sum over ranks of dy_r . W_r.
      std::vector<float> want_dx(T * K, 0.0f);
      for (int s = 0; s < tp; ++s) {
        const Tensor ws = testing::fused_rows(specs[s], full_of);
        const std::vector<float> part =
            matmul(dys[s].data(), ws.dim(0), 1, ws.data<float>(), K, 1, T, ws.dim(0), K);
        for (int64_t i = 0; i < T * K; ++i) want_dx[i] += part[i];
      }
      EXPECT_LT(rel_error(dx, want_dx), 1e-5) << "TP " << tp;
      // dW of each local row: the sum of dy^T x over every rank holding that full row.
      for (size_t pi = 0; pi < specs[r].parts.size(); ++pi) {
        const FusedPart& part = specs[r].parts[pi];
        std::vector<float> want(part.rows.size() * K, 1.0f);
        for (int s = 0; s < tp; ++s) {
          const FusedPart& other = specs[s].part(part.name);
          if (other.rows.begin != part.rows.begin) continue;
          const int64_t off = specs[s].offset(specs[s].index(part.name));
          const std::vector<float> g_s = matmul(dys[s].data() + off, 1, specs[s].size(), x.data(),
                                                K, 1, part.rows.size(), T, K);
          for (size_t i = 0; i < want.size(); ++i) want[i] += g_s[i];
        }
        const int64_t off = specs[r].offset(pi);
        const std::vector<float> got(dw.begin() + off * K,
                                     dw.begin() + (off + part.rows.size()) * K);
        EXPECT_LT(rel_error(got, want), 1e-5) << "TP " << tp << " " << part.name;
      }
    });
  }
}

TEST(ParallelBackward, RowParallelLinearLmHeadAndEmbedding) {
  const int64_t T = 4, N = 7, K = 11, V = 10;
  const Tensor w = random_matrix(N, K, 5), head_w = random_matrix(V, N, 6);
  const std::vector<float> x = random_floats(T * K, 7), dy = random_floats(T * N, 8);
  const std::vector<float> h = random_floats(T * N, 9), dlogits = random_floats(T * V, 10);
  const std::vector<int32_t> ids = {3, 9, 0, 3};
  // Full-tensor expectations.
  const std::vector<float> dx_full = matmul(dy.data(), N, 1, w.data<float>(), K, 1, T, N, K);
  const std::vector<float> dw_full = matmul(dy.data(), 1, N, x.data(), K, 1, N, T, K);
  const std::vector<float> dh = matmul(dlogits.data(), V, 1, head_w.data<float>(), N, 1, T, V, N);
  const std::vector<float> dhead = matmul(dlogits.data(), 1, V, h.data(), N, 1, V, T, N);
  std::vector<float> dtable(V * N, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < N; ++j) dtable[ids[t] * N + j] += dh[t * N + j];
  for (int tp : {1, 3}) {
    run_tp(tp, [&](comm::Group g) {
      const ShardSpec in = ShardSpec::even(K, tp, g.rank()), vs = ShardSpec::even(V, tp, g.rank());
      // Row-parallel: x and W split along K; dy the same on every rank; no communication.
      const RowParallelLinear row(testing::cols_of(w, in), in, g);
      const std::vector<float> x_local = cols(x, K, in.begin, in.end);
      std::vector<float> dx(T * in.size()), dw(N * in.size(), 0.0f);
      row.backward(x_local.data(), dy.data(), T, dx.data(), dw.data());
      EXPECT_LT(rel_error(dx, cols(dx_full, K, in.begin, in.end)), 1e-5);
      EXPECT_LT(rel_error(dw, cols(dw_full, K, in.begin, in.end)), 1e-5);
      // LM head: vocab rows; dx all-reduced.
      const VocabParallelLmHead head(testing::rows_of(head_w, vs), vs, g);
      const std::vector<float> dl = cols(dlogits, V, vs.begin, vs.end);
      std::vector<float> dhx(T * N), dhw(vs.size() * N, 0.0f);
      head.backward(h.data(), dl.data(), T, dhx.data(), dhw.data());
      EXPECT_LT(rel_error(dhx, dh), 1e-5);
      EXPECT_LT(rel_error(dhw, rows(dhead, N, vs.begin, vs.end)), 1e-5);
      // Embedding: each rank adds the rows of the ids it owns (the repeated id twice).
      const VocabParallelEmbedding emb(testing::rows_of(head_w, vs), vs, g);
      std::vector<float> dt(vs.size() * N, 0.0f);
      emb.backward(ids.data(), T, dh.data(), dt.data());
      EXPECT_LT(rel_error(dt, rows(dtable, N, vs.begin, vs.end)), 1e-6);
    });
  }
}

}  // namespace
}  // namespace parallm::parallel
