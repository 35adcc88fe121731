// measure_training_rates: what parallm's own training kernels reach on this machine, so that the
// planner's training step time for --gpu cpu stands on measured rates, as its decode time stands
// on a measured memory bandwidth.
#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "parallm/core/thread_pool.h"
#include "parallm/kernels/backward.h"
#include "parallm/plan/hardware.h"

namespace parallm::plan {
namespace {

// Seconds `f` takes.
template <typename F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One rank's measurement, on the calling thread with a pool of `threads`.
TrainingRates measure_one(const ModelConfig& c, int64_t micro_batch, int64_t seq_len, int threads) {
  ThreadPool pool(std::max(1, threads));
  ScopedPool scope(pool);
  TrainingRates r;
  const int64_t H = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), f = c.intermediate_size;
  // The layer's products: qkv [H -> qd + 2 kvd], o [qd -> H], gate|up [H -> 2f], down [f -> H];
  // sides beyond 4096 measured at 4096 (a GEMM that wide runs at its large-matrix rate anyway, and
  // a 70B layer's matrices would take gigabytes and minutes).
  auto side = [](int64_t n) { return std::min<int64_t>(n, 4096); };
  const int64_t shapes[4][2] = {{side(qd + 2 * kvd), side(H)},
                                {side(H), side(qd)},
                                {side(2 * f), side(H)},
                                {side(H), side(f)}};
  double per_token = 0;  // multiply-adds per token
  int64_t widest = 0;
  for (const auto& s : shapes) {
    per_token += double(s[0]) * double(s[1]);
    widest = std::max({widest, s[0], s[1]});
  }
  const int64_t most = std::min<int64_t>(micro_batch * seq_len, 512);
  const int64_t T =
      std::clamp<int64_t>(int64_t(2e9 / per_token), std::min<int64_t>(64, most), most);
  const int64_t head[2] = {side(c.vocab_size), side(H)};
  size_t wmax = size_t(head[0] * head[1]);
  for (const auto& s : shapes) wmax = std::max(wmax, size_t(s[0] * s[1]));
  widest = std::max(widest, head[0]);
  std::vector<float> w(wmax, 0.01f), dw(wmax, 0.f), x(size_t(T * widest), 0.02f),
      y(size_t(T * widest), 0.f);
  const double flops = 2.0 * double(T) * per_token;
  auto gemm_f = [&] {
    for (const auto& s : shapes)
      kernels::linear_forward(x.data(), w.data(), T, s[0], s[1], y.data());
  };
  const double head_flops = 2.0 * double(T) * double(head[0]) * double(head[1]);
  auto head_f = [&] { kernels::linear_forward(x.data(), w.data(), T, head[0], head[1], y.data()); };
  auto head_b = [&] {
    kernels::linear_backward_input(x.data(), w.data(), T, head[0], head[1], y.data());
    kernels::linear_backward_weight(x.data(), y.data(), T, head[0], head[1], dw.data());
  };
  auto gemm_b = [&] {
    for (const auto& s : shapes) {
      kernels::linear_backward_input(x.data(), w.data(), T, s[0], s[1], y.data());
      kernels::linear_backward_weight(x.data(), y.data(), T, s[0], s[1], dw.data());
    }
  };
  // Attention: KV heads keep the model's grouping (query heads per KV head), up to 8 query heads.
  const int64_t group = std::max<int64_t>(1, c.num_attention_heads / c.num_key_value_heads);
  const int64_t hkv = std::clamp<int64_t>(8 / group, 1, c.num_key_value_heads);
  const int64_t hq = hkv * group, hd = c.head_dim, S = std::min<int64_t>(seq_len, 512);
  std::vector<float> q(size_t(S * hq * hd), 0.02f), k(size_t(S * hkv * hd), 0.03f),
      v(size_t(S * hkv * hd), 0.01f), out(q.size()), probs(size_t(hq * S * S)), dq(q.size()),
      dk(k.size()), dv(v.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = 0.02f * float(i % 17);
  const double attn = 2.0 * double(hq) * double(S) * double(S) * double(hd);
  auto attn_f = [&] {
    kernels::attention_forward(q.data(), k.data(), v.data(), 1, S, hq, hkv, hd, out.data(),
                               probs.data());
  };
  auto attn_b = [&] {
    kernels::attention_backward(q.data(), k.data(), v.data(), probs.data(), q.data(), 1, S, hq, hkv,
                                hd, dq.data(), dk.data(), dv.data());
  };
  // One warm-up round, then five rounds of all six, interleaved so that each meets the same
  // load; the rates are the work over the time summed (the mean: on a shared machine the training
  // that follows meets the load on average, not its quietest moment).
  gemm_f(), gemm_b(), attn_f(), attn_b(), head_f(), head_b();
  double t[6] = {0, 0, 0, 0, 0, 0};
  constexpr int kRounds = 5;
  for (int round = 0; round < kRounds; ++round) {
    t[0] += seconds(gemm_f);
    t[1] += seconds(gemm_b);
    t[2] += seconds(attn_f);
    t[3] += seconds(attn_b);
    t[4] += seconds(head_f);
    t[5] += seconds(head_b);
  }
  r.gemm_forward = kRounds * flops / std::max(t[0], 1e-9);
  r.gemm_backward = kRounds * 2 * flops / std::max(t[1], 1e-9);
  r.attention_forward = kRounds * attn / std::max(t[2], 1e-9);
  r.attention_backward = kRounds * 2 * attn / std::max(t[3], 1e-9);
  r.head_forward = kRounds * head_flops / std::max(t[4], 1e-9);
  r.head_backward = kRounds * 2 * head_flops / std::max(t[5], 1e-9);
  return r;
}

}  // namespace

TrainingRates measure_training_rates(const ModelConfig& c, int64_t micro_batch, int64_t seq_len,
                                     int threads, int ranks) {
  // At most one measuring rank per hardware thread (and 16): beyond that they only queue.
  ranks = std::clamp(ranks, 1, std::min(16, ThreadPool::hardware_threads()));
  std::vector<TrainingRates> each(static_cast<size_t>(ranks));
  std::vector<std::thread> running;
  for (int i = 0; i < ranks; ++i)
    running.emplace_back(
        [&, i] { each[size_t(i)] = measure_one(c, micro_batch, seq_len, threads); });
  for (std::thread& t : running) t.join();
  TrainingRates r;
  for (const TrainingRates& e : each) {
    r.gemm_forward += e.gemm_forward / ranks;
    r.gemm_backward += e.gemm_backward / ranks;
    r.attention_forward += e.attention_forward / ranks;
    r.attention_backward += e.attention_backward / ranks;
    r.head_forward += e.head_forward / ranks;
    r.head_backward += e.head_backward / ranks;
  }
  return r;
}

}  // namespace parallm::plan
