#include "parallm/parallel/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"
#include "parallm/kernels/backward.h"
#include "parallm/kernels/ops.h"

namespace parallm::parallel {

void moe_route(const float* xn, int64_t T, const float* router, int64_t E, int64_t H, int k,
               bool renormalize, int32_t* experts, float* weights, float* probs) {
  if (k < 1 || k > E) fail("moe", "top-k ", k, " must be in 1..", E, " (the number of experts)");
  std::vector<float> p(static_cast<size_t>(E));
  std::vector<char> taken(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* x = xn + t * H;
    // One dot product per expert in a fixed order, so a token's routing does not depend on the
    // other tokens of the call (a batched GEMM may sum differently for other row counts).
    float mx = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      const float* w = router + e * H;
      float s = 0;
      for (int64_t h = 0; h < H; ++h) s += x[h] * w[h];
      p[e] = s;
      mx = std::max(mx, s);
    }
    float sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      p[e] = std::exp(p[e] - mx);
      sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    if (probs != nullptr) std::copy(p.begin(), p.end(), probs + t * E);
    std::fill(taken.begin(), taken.end(), 0);
    int32_t* ex = experts + t * k;
    float* wt = weights + t * k;
    float chosen = 0;
    for (int j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = 1;
      ex[j] = static_cast<int32_t>(best);
      wt[j] = p[best];
      chosen += p[best];
    }
    if (renormalize)
      for (int j = 0; j < k; ++j) wt[j] /= chosen;
  }
}

MoeLayer::MoeLayer(Tensor router, std::vector<Tensor> w13, std::vector<Tensor> w2, int top_k,
                   ShardSpec experts, ShardSpec ffn, comm::Group ep, comm::Group tp,
                   bool renormalize, MoeMode mode)
    : router_(std::move(router)),
      top_k_(top_k),
      renormalize_(renormalize),
      mode_(mode),
      experts_(experts),
      ffn_(ffn),
      ep_(std::move(ep)),
      tp_(std::move(tp)) {
  if (router_.dtype() != DType::F32 || router_.ndim() != 2)
    fail("moe", "the router must be an f32 [experts, hidden] matrix, got ", router_.describe());
  const int64_t E = router_.dim(0), H = router_.dim(1);
  if (top_k_ < 1 || top_k_ > E)
    fail("moe", "num_experts_per_tok ", top_k_, " must be in 1..", E, " (the model's experts)");
  const ShardSpec want = expert_range(E, ep_.size(), ep_.rank());
  if (!(experts_ == want))
    fail("moe", "EP rank ", ep_.rank(), " of ", ep_.size(), " holds experts [", want.begin, ", ",
         want.end, "), given [", experts_.begin, ", ", experts_.end, ")");
  if (static_cast<int64_t>(w13.size()) != experts_.size() ||
      static_cast<int64_t>(w2.size()) != experts_.size())
    fail("moe", "EP rank ", ep_.rank(), " holds ", experts_.size(), " experts but was given ",
         w13.size(), " w1/w3 and ", w2.size(), " w2 weights");
  if (mode_ == MoeMode::AllReduce && tp_.size() != 1)
    fail("moe", "the all-reduce expert layout holds whole experts: its TP group must be size 1, ",
         "got ", tp_.size());
  const FusedShardSpec spec{{{"w1", ffn_, 1}, {"w3", ffn_, 1}}};
  for (size_t i = 0; i < w13.size(); ++i) {
    if (w13[i].ndim() != 2 || w13[i].dim(0) != 2 * ffn_.size() || w13[i].dim(1) != H ||
        w2[i].ndim() != 2 || w2[i].dim(0) != H || w2[i].dim(1) != ffn_.size())
      fail("moe", "expert ", experts_.begin + static_cast<int64_t>(i), ": w1|w3 ",
           w13[i].describe(), " and w2 ", w2[i].describe(), " do not fit hidden ", H,
           " and FFN shard ", ffn_.size());
    w13_.emplace_back(std::move(w13[i]), spec, tp_);
    w2_.emplace_back(std::move(w2[i]), ffn_, tp_);
  }
  reset_counters();
}

void MoeLayer::reset_counters() const {
  expert_rows_.assign(static_cast<size_t>(experts_.size()), 0);
  rows_sent_.assign(static_cast<size_t>(ep_.size()), 0);
}

uint64_t MoeLayer::weight_bytes() const {
  uint64_t b = router_.nbytes();
  for (size_t i = 0; i < w13_.size(); ++i)
    b += w13_[i].weight().nbytes() + w2_[i].weight().nbytes();
  return b;
}

void MoeLayer::expert_ffn(size_t i, const float* x, int64_t n, std::vector<float>& gu,
                          float* y) const {
  const int64_t fl = ffn_.size();
  gu.resize(static_cast<size_t>(n * 2 * fl));
  w13_[i].forward(x, n, gu.data());
  for (int64_t j = 0; j < n; ++j) {
    float* row = gu.data() + j * 2 * fl;
    kernels::silu_mul(row, row + fl, gu.data() + j * fl, fl);  // packs [n, fl] at the front
  }
  w2_[i].forward(gu.data(), n, y, /*reduce=*/false);
}

void MoeLayer::forward_tokens(const float* xn, int64_t T, float* out, MoeCallStats* stats) const {
  const int64_t E = num_experts(), H = hidden();
  const int k = top_k_, P = ep_.size();
  const int64_t W = H + 2;  // a dispatched row: hidden vector, routing weight, expert id

  // 1. Route, then pack one row per (token, choice) by destination rank, (token, choice) order.
  std::vector<int32_t> ex(static_cast<size_t>(T * k));
  std::vector<float> wt(static_cast<size_t>(T * k));
  {
    TraceSpan span("moe route", "compute");
    moe_route(xn, T, router_.data<float>(), E, H, k, renormalize_, ex.data(), wt.data());
  }
  std::vector<int64_t> send_rows(P, 0), recv_rows(P, 0);
  for (int64_t i = 0; i < T * k; ++i) ++send_rows[expert_owner(ex[i], E, P)];
  std::vector<int64_t> offset(P + 1, 0);
  for (int r = 0; r < P; ++r) offset[r + 1] = offset[r] + send_rows[r];
  std::vector<int64_t> slot(static_cast<size_t>(T * k));  // where (token, choice)'s row was sent
  std::vector<float> send(static_cast<size_t>(offset[P] * W));
  {
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j) {
        const int64_t i = t * k + j;
        const int64_t row = fill[expert_owner(ex[i], E, P)]++;
        slot[i] = row;
        float* dst = send.data() + row * W;
        std::memcpy(dst, xn + t * H, H * sizeof(float));
        dst[H] = wt[i];
        std::memcpy(dst + H + 1, &ex[i], sizeof(int32_t));
      }
  }

  // 2. Counts, then rows.
  std::vector<size_t> ones(P, 1);
  ep_.all_to_all(send_rows.data(), ones, recv_rows.data(), ones, DType::I64);
  std::vector<size_t> send_counts(P), recv_counts(P);
  int64_t R = 0;
  for (int r = 0; r < P; ++r) {
    send_counts[r] = static_cast<size_t>(send_rows[r] * W);
    recv_counts[r] = static_cast<size_t>(recv_rows[r] * W);
    R += recv_rows[r];
  }
  std::vector<float> recv(static_cast<size_t>(R * W));
  ep_.all_to_all(send.data(), send_counts, recv.data(), recv_counts, DType::F32);

  // 3. Each local expert's rows as one GEMM pair; results in arrival order.
  std::vector<float> result(static_cast<size_t>(R * H), 0.0f);
  {
    TraceSpan span("moe experts", "compute");
    std::vector<std::vector<int64_t>> rows_of(static_cast<size_t>(experts_.size()));
    for (int64_t r = 0; r < R; ++r) {
      int32_t e = 0;
      std::memcpy(&e, recv.data() + r * W + H + 1, sizeof(int32_t));
      if (e < experts_.begin || e >= experts_.end)
        fail<std::runtime_error>("moe", "EP rank ", ep_.rank(), " received a row for expert ", e,
                                 ", which it does not hold [", experts_.begin, ", ", experts_.end,
                                 ")");
      rows_of[e - experts_.begin].push_back(r);
    }
    std::vector<float> x, gu, y;
    for (size_t i = 0; i < rows_of.size(); ++i) {
      const std::vector<int64_t>& rows = rows_of[i];
      const int64_t n = static_cast<int64_t>(rows.size());
      if (stats) stats->rows_per_expert.push_back(n);
      expert_rows_[i] += n;
      if (n == 0) continue;  // the same on every TP rank: they received the same rows
      x.resize(n * H);
      y.resize(n * H);
      for (int64_t j = 0; j < n; ++j)
        std::memcpy(&x[j * H], recv.data() + rows[j] * W, H * sizeof(float));
      expert_ffn(i, x.data(), n, gu, y.data());
      for (int64_t j = 0; j < n; ++j)
        std::memcpy(&result[rows[j] * H], &y[j * H], H * sizeof(float));
    }
  }
  // Every TP rank of this EP rank received the same rows: one all-reduce sums their FFN slices.
  if (tp_.size() > 1 && R > 0) tp_.all_reduce(result.data(), static_cast<size_t>(R * H));
  for (int64_t r = 0; r < R; ++r) {
    const float w = recv[r * W + H];
    float* row = result.data() + r * H;
    for (int64_t h = 0; h < H; ++h) row[h] *= w;
  }

  // 4. Back to the senders, and each token's k rows summed in top-k order.
  std::vector<float> back(static_cast<size_t>(offset[P] * H));
  for (int r = 0; r < P; ++r) {
    send_counts[r] = static_cast<size_t>(recv_rows[r] * H);
    recv_counts[r] = static_cast<size_t>(send_rows[r] * H);
  }
  ep_.all_to_all(result.data(), send_counts, back.data(), recv_counts, DType::F32);
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * H;
    std::memcpy(o, back.data() + slot[t * k] * H, H * sizeof(float));
    for (int j = 1; j < k; ++j) {
      const float* b = back.data() + slot[t * k + j] * H;
      for (int64_t h = 0; h < H; ++h) o[h] += b[h];
    }
  }
  if (stats) stats->rows_to_rank = send_rows;
  for (int r = 0; r < P; ++r) rows_sent_[r] += send_rows[r];
}

void MoeLayer::forward_all_reduce(const float* xn, int64_t T, float* out) const {
  const int64_t E = num_experts(), H = hidden();
  const int k = top_k_, P = ep_.size();
  std::vector<int32_t> ex(static_cast<size_t>(T * k));
  std::vector<float> wt(static_cast<size_t>(T * k));
  {
    TraceSpan span("moe route", "compute");
    moe_route(xn, T, router_.data<float>(), E, H, k, renormalize_, ex.data(), wt.data());
  }
  for (int64_t i = 0; i < T * k; ++i) ++rows_sent_[expert_owner(ex[i], E, P)];
  // Y [T, k, H]: slot (t, j) holds weight x expert(x_t) on the rank owning its expert, else zeros.
  std::vector<float> Y(static_cast<size_t>(T * k * H), 0.0f);
  {
    TraceSpan span("moe experts", "compute");
    // Each local expert's slots in (token, choice) order: the rows Dispatch mode's GEMM sees at
    // EP 1 (one destination, packed in (token, choice) order), so the GEMM sums the same way.
    std::vector<std::vector<int64_t>> slots_of(static_cast<size_t>(experts_.size()));
    for (int64_t i = 0; i < T * k; ++i)
      if (ex[i] >= experts_.begin && ex[i] < experts_.end)
        slots_of[ex[i] - experts_.begin].push_back(i);
    std::vector<float> x, gu, y;
    for (size_t e = 0; e < slots_of.size(); ++e) {
      const std::vector<int64_t>& slots = slots_of[e];
      const int64_t n = static_cast<int64_t>(slots.size());
      expert_rows_[e] += n;
      if (n == 0) continue;
      x.resize(n * H);
      y.resize(n * H);
      for (int64_t j = 0; j < n; ++j)
        std::memcpy(&x[j * H], xn + (slots[j] / k) * H, H * sizeof(float));
      expert_ffn(e, x.data(), n, gu, y.data());
      for (int64_t j = 0; j < n; ++j) {
        const float w = wt[slots[j]];
        float* dst = Y.data() + slots[j] * H;
        const float* src = y.data() + j * H;
        for (int64_t h = 0; h < H; ++h) dst[h] = src[h] * w;
      }
    }
  }
  // One non-zero contributor per element: the sum is exact in any order.
  if (P > 1 && T > 0) ep_.all_reduce(Y.data(), static_cast<size_t>(T * k * H));
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * H;
    std::memcpy(o, Y.data() + t * k * H, H * sizeof(float));
    for (int j = 1; j < k; ++j) {
      const float* b = Y.data() + (t * k + j) * H;
      for (int64_t h = 0; h < H; ++h) o[h] += b[h];
    }
  }
}

void MoeLayer::forward(const float* xn, int64_t T, float* out) const {
  if (mode_ == MoeMode::AllReduce) {
    forward_all_reduce(xn, T, out);
    return;
  }
  const int P = ep_.size(), r = ep_.rank();
  if (P == 1) {
    forward_tokens(xn, T, out);
    return;
  }
  const int64_t H = hidden();
  const ShardSpec mine = ShardSpec::even(T, P, r);
  const int64_t most = ShardSpec::max_size(T, P);
  std::vector<float> part(static_cast<size_t>(most * H), 0.0f),
      all(static_cast<size_t>(P * most * H));
  forward_tokens(xn + mine.begin * H, mine.size(), part.data());
  ep_.all_gather(part.data(), all.data(), static_cast<size_t>(most * H), DType::F32);
  for (int q = 0; q < P; ++q) {
    const ShardSpec s = ShardSpec::even(T, P, q);
    std::memcpy(out + s.begin * H, all.data() + q * most * H, s.size() * H * sizeof(float));
  }
}

// ---- training ----

MoeTrainLayer::MoeTrainLayer(int64_t num_experts, int64_t hidden, int top_k, bool renormalize,
                             ShardSpec experts, ShardSpec ffn, comm::Group ep, comm::Group tp)
    : E_(num_experts),
      H_(hidden),
      k_(top_k),
      renormalize_(renormalize),
      experts_(experts),
      ffn_(ffn),
      ep_(std::move(ep)),
      tp_(std::move(tp)) {
  if (k_ < 1 || k_ > E_)
    fail("moe", "num_experts_per_tok ", k_, " must be in 1..", E_, " (the model's experts)");
  const ShardSpec want = expert_range(E_, ep_.size(), ep_.rank());
  if (!(experts_ == want))
    fail("moe", "EP rank ", ep_.rank(), " of ", ep_.size(), " holds experts [", want.begin, ", ",
         want.end, "), given [", experts_.begin, ", ", experts_.end, ")");
}

namespace {

void check_weights(const MoeTrainWeights& w, const ShardSpec& experts) {
  const size_t n = static_cast<size_t>(experts.size());
  if (w.router == nullptr || w.w1.size() != n || w.w3.size() != n || w.w2.size() != n)
    fail("moe", "training weights for ", w.w1.size(), " experts, this rank holds ", n);
}

}  // namespace

void MoeTrainLayer::forward(const MoeTrainWeights& w, const float* xn, int64_t T, MoeCache& c,
                            float* out) const {
  check_weights(w, experts_);
  const int64_t E = E_, H = H_, fl = ffn_.size();
  const int k = k_, P = ep_.size();
  const int64_t W = H + 2;
  c.probs.resize(static_cast<size_t>(T * E));
  c.experts.resize(static_cast<size_t>(T * k));
  c.weights.resize(static_cast<size_t>(T * k));
  moe_route(xn, T, w.router, E, H, k, renormalize_, c.experts.data(), c.weights.data(),
            c.probs.data());
  c.send_rows.assign(static_cast<size_t>(P), 0);
  c.recv_rows.assign(static_cast<size_t>(P), 0);
  for (int64_t i = 0; i < T * k; ++i) ++c.send_rows[expert_owner(c.experts[i], E, P)];
  std::vector<int64_t> fill(static_cast<size_t>(P), 0);
  for (int r = 1; r < P; ++r) fill[r] = fill[r - 1] + c.send_rows[r - 1];
  const int64_t sent = T * k;
  std::vector<float> send(static_cast<size_t>(sent * W));
  c.slot.resize(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const int64_t i = t * k + j;
      const int64_t row = fill[expert_owner(c.experts[i], E, P)]++;
      c.slot[i] = row;
      float* dst = send.data() + row * W;
      std::memcpy(dst, xn + t * H, H * sizeof(float));
      dst[H] = c.weights[i];
      std::memcpy(dst + H + 1, &c.experts[i], sizeof(int32_t));
    }
  std::vector<size_t> ones(static_cast<size_t>(P), 1), sc(P), rc(P);
  ep_.all_to_all(c.send_rows.data(), ones, c.recv_rows.data(), ones, DType::I64);
  int64_t R = 0;
  for (int r = 0; r < P; ++r) {
    sc[r] = static_cast<size_t>(c.send_rows[r] * W);
    rc[r] = static_cast<size_t>(c.recv_rows[r] * W);
    R += c.recv_rows[r];
  }
  c.recv.resize(static_cast<size_t>(R * W));
  ep_.all_to_all(send.data(), sc, c.recv.data(), rc, DType::F32);

  // Rows grouped by local expert (arrival order within one), each expert one GEMM pair.
  const int64_t L = experts_.size();
  std::vector<std::vector<int64_t>> rows_of(static_cast<size_t>(L));
  for (int64_t r = 0; r < R; ++r) {
    int32_t e = 0;
    std::memcpy(&e, c.recv.data() + r * W + H + 1, sizeof(int32_t));
    if (e < experts_.begin || e >= experts_.end)
      fail<std::runtime_error>("moe", "EP rank ", ep_.rank(), " received a row for expert ", e,
                               ", which it does not hold");
    rows_of[e - experts_.begin].push_back(r);
  }
  c.order.clear();
  c.per_expert.assign(static_cast<size_t>(L), 0);
  for (int64_t i = 0; i < L; ++i) {
    c.per_expert[i] = static_cast<int64_t>(rows_of[i].size());
    c.order.insert(c.order.end(), rows_of[i].begin(), rows_of[i].end());
  }
  c.gu.resize(static_cast<size_t>(R * 2 * fl));
  c.h.resize(static_cast<size_t>(R * fl));
  c.y.assign(static_cast<size_t>(R * H), 0.0f);
  std::vector<float> x, g, u, y;
  int64_t at = 0;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t n = c.per_expert[i];
    if (n == 0) continue;
    x.resize(n * H), g.resize(n * fl), u.resize(n * fl), y.resize(n * H);
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(&x[j * H], c.recv.data() + c.order[at + j] * W, H * sizeof(float));
    kernels::linear_forward(x.data(), w.w1[i], n, fl, H, g.data());
    kernels::linear_forward(x.data(), w.w3[i], n, fl, H, u.data());
    float* gu = c.gu.data() + at * 2 * fl;
    float* h = c.h.data() + at * fl;
    for (int64_t j = 0; j < n; ++j) {
      std::memcpy(gu + j * 2 * fl, &g[j * fl], fl * sizeof(float));
      std::memcpy(gu + j * 2 * fl + fl, &u[j * fl], fl * sizeof(float));
    }
    kernels::silu_mul(g.data(), u.data(), h, n * fl);
    kernels::linear_forward(h, w.w2[i], n, H, fl, y.data());
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(&c.y[c.order[at + j] * H], &y[j * H], H * sizeof(float));
    at += n;
  }
  if (tp_.size() > 1 && R > 0) tp_.all_reduce(c.y.data(), static_cast<size_t>(R * H));
  std::vector<float> result(static_cast<size_t>(R * H));
  for (int64_t r = 0; r < R; ++r) {
    const float wr = c.recv[r * W + H];
    for (int64_t hh = 0; hh < H; ++hh) result[r * H + hh] = c.y[r * H + hh] * wr;
  }
  std::vector<float> back(static_cast<size_t>(sent * H));
  for (int r = 0; r < P; ++r) {
    sc[r] = static_cast<size_t>(c.recv_rows[r] * H);
    rc[r] = static_cast<size_t>(c.send_rows[r] * H);
  }
  ep_.all_to_all(result.data(), sc, back.data(), rc, DType::F32);
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * H;
    std::memcpy(o, back.data() + c.slot[t * k] * H, H * sizeof(float));
    for (int j = 1; j < k; ++j) {
      const float* b = back.data() + c.slot[t * k + j] * H;
      for (int64_t hh = 0; hh < H; ++hh) o[hh] += b[hh];
    }
  }
}

void MoeTrainLayer::backward(const MoeTrainWeights& w, const float* xn, const MoeCache& c,
                             const float* dout, int64_t T, const float* aux_dprob, float* dxn,
                             const MoeTrainGrads& g) const {
  check_weights(w, experts_);
  const int64_t E = E_, H = H_, fl = ffn_.size();
  const int k = k_, P = ep_.size();
  const int64_t W = H + 2;
  const int64_t sent = T * k;
  // 1. Each (token, choice)'s output gradient to its expert's rank, in the forward's row order.
  std::vector<float> send(static_cast<size_t>(sent * H));
  for (int64_t i = 0; i < sent; ++i)
    std::memcpy(send.data() + c.slot[i] * H, dout + (i / k) * H, H * sizeof(float));
  std::vector<size_t> sc(P), rc(P);
  int64_t R = 0;
  for (int r = 0; r < P; ++r) {
    sc[r] = static_cast<size_t>(c.send_rows[r] * H);
    rc[r] = static_cast<size_t>(c.recv_rows[r] * H);
    R += c.recv_rows[r];
  }
  std::vector<float> drow(static_cast<size_t>(R * H));
  ep_.all_to_all(send.data(), sc, drow.data(), rc, DType::F32);

  // 2. Per row: dweight = dout . y; the expert's backward from dy = weight * dout.
  const int64_t B = H + 1;  // a returned row: the input gradient, then dweight
  std::vector<float> ret(static_cast<size_t>(R * B), 0.0f);
  for (int64_t r = 0; r < R; ++r) {
    double s = 0;
    for (int64_t hh = 0; hh < H; ++hh) s += static_cast<double>(drow[r * H + hh]) * c.y[r * H + hh];
    ret[r * B + H] = static_cast<float>(s);
  }
  std::vector<float> dxr(static_cast<size_t>(R * H), 0.0f);
  std::vector<float> x, dy, dh, dg, du, gate, up, dx;
  int64_t at = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(c.per_expert.size()); ++i) {
    const int64_t n = c.per_expert[i];
    if (n == 0) continue;
    x.resize(n * H), dy.resize(n * H), dh.resize(n * fl), dg.resize(n * fl), du.resize(n * fl);
    gate.resize(n * fl), up.resize(n * fl), dx.resize(n * H);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = c.order[at + j];
      std::memcpy(&x[j * H], c.recv.data() + r * W, H * sizeof(float));
      const float wr = c.recv[r * W + H];
      for (int64_t hh = 0; hh < H; ++hh) dy[j * H + hh] = wr * drow[r * H + hh];
      const float* gu = c.gu.data() + (at + j) * 2 * fl;
      std::memcpy(&gate[j * fl], gu, fl * sizeof(float));
      std::memcpy(&up[j * fl], gu + fl, fl * sizeof(float));
    }
    const float* h = c.h.data() + at * fl;
    // y = h . w2^T: dh = dy . w2, dw2 += dy^T h.
    kernels::linear_backward_input(dy.data(), w.w2[i], n, H, fl, dh.data());
    kernels::linear_backward_weight(dy.data(), h, n, H, fl, g.w2[i]);
    kernels::swiglu_backward(gate.data(), up.data(), dh.data(), n * fl, dg.data(), du.data());
    kernels::linear_backward_weight(dg.data(), x.data(), n, fl, H, g.w1[i]);
    kernels::linear_backward_weight(du.data(), x.data(), n, fl, H, g.w3[i]);
    kernels::linear_backward_input(dg.data(), w.w1[i], n, fl, H, dx.data());
    kernels::linear_backward_input(du.data(), w.w3[i], n, fl, H, dx.data(), /*accumulate=*/true);
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(&dxr[c.order[at + j] * H], &dx[j * H], H * sizeof(float));
    at += n;
  }
  // The FFN is split over TP: the input gradient's partial sums (copy_to_region's backward).
  if (tp_.size() > 1 && R > 0) tp_.all_reduce(dxr.data(), static_cast<size_t>(R * H));
  for (int64_t r = 0; r < R; ++r) std::memcpy(&ret[r * B], &dxr[r * H], H * sizeof(float));

  // 3. Back to the tokens' ranks.
  std::vector<float> back(static_cast<size_t>(sent * B));
  for (int r = 0; r < P; ++r) {
    sc[r] = static_cast<size_t>(c.recv_rows[r] * B);
    rc[r] = static_cast<size_t>(c.send_rows[r] * B);
  }
  ep_.all_to_all(ret.data(), sc, back.data(), rc, DType::F32);

  // 4. dxn = the k rows' input gradients + the router's; the router's gradient.
  std::vector<float> dl(static_cast<size_t>(T * E));
  std::vector<double> dp(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    float* o = dxn + t * H;
    std::memcpy(o, back.data() + c.slot[t * k] * B, H * sizeof(float));
    for (int j = 1; j < k; ++j) {
      const float* b = back.data() + c.slot[t * k + j] * B;
      for (int64_t hh = 0; hh < H; ++hh) o[hh] += b[hh];
    }
    const float* p = c.probs.data() + t * E;
    for (int64_t e = 0; e < E; ++e) dp[e] = aux_dprob != nullptr ? aux_dprob[e] : 0.0;
    const int32_t* ex = c.experts.data() + t * k;
    const float* wt = c.weights.data() + t * k;
    if (renormalize_) {
      double s = 0, wdw = 0;
      for (int j = 0; j < k; ++j) {
        s += p[ex[j]];
        wdw += static_cast<double>(wt[j]) * back[c.slot[t * k + j] * B + H];
      }
      for (int j = 0; j < k; ++j) dp[ex[j]] += (back[c.slot[t * k + j] * B + H] - wdw) / s;
    } else {
      for (int j = 0; j < k; ++j) dp[ex[j]] += back[c.slot[t * k + j] * B + H];
    }
    double pdp = 0;
    for (int64_t e = 0; e < E; ++e) pdp += p[e] * dp[e];
    for (int64_t e = 0; e < E; ++e) dl[t * E + e] = static_cast<float>(p[e] * (dp[e] - pdp));
  }
  // logits = xn . Wg^T: dWg += dl^T xn, dxn += dl . Wg.
  if (T > 0) {
    kernels::linear_backward_weight(dl.data(), xn, T, E, H, g.router);
    kernels::linear_backward_input(dl.data(), w.router, T, E, H, dxn, /*accumulate=*/true);
  }
}

}  // namespace parallm::parallel
