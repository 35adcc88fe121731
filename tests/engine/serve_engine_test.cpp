// The serving engine (engine/serve_engine.h) on stories260K, ranks as threads: continuous
// batching gives every request the tokens `parallm generate` gives its prompt alone (greedy, and
// seeded sampling), at TP 1, TP 2, PP 2, TP 2 x PP 2 and DP 2, with requests submitted from
// several threads while others run; a tiny KV cache preempts and still completes every request
// exactly; prefix caching hits and changes nothing; cancel frees blocks at once; a short request
// finishes during a long one; shutdown ends every rank with running requests cancelled.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <thread>

#include "serve_test_util.h"

namespace parallm::serve {
namespace {

using testing::Outcome;
using testing::Sink;
using testing::Watchdog;

struct Layout {
  int tp, pp, dp;
  bool split = false;  // --pp-split on
};

// Submits `prompts` from `threads` threads while the engine runs; checks each against the
// reference; returns the most requests seen running at once.
int64_t run_and_compare(ServeEngine& engine, const std::vector<std::vector<int32_t>>& prompts,
                        const std::vector<int64_t>& max_tokens,
                        const std::vector<std::vector<int32_t>>& want, int threads,
                        bool ignore_eos = true) {
  Sink sink;
  std::vector<std::shared_ptr<Outcome>> outs(prompts.size());
  std::atomic<int64_t> peak{0};
  std::vector<std::thread> submitters;
  for (int t = 0; t < threads; ++t)
    submitters.emplace_back([&, t] {
      for (size_t i = t; i < prompts.size(); i += threads) {
        GenParams p;
        p.max_tokens = max_tokens[i];
        p.temperature = 0;
        p.ignore_eos = ignore_eos;
        sink.submit(engine, prompts[i], p, &outs[i]);
        const int64_t r = engine.stats().running;
        int64_t cur = peak.load();
        while (r > cur && !peak.compare_exchange_weak(cur, r)) {
        }
        std::this_thread::sleep_for(std::chrono::microseconds(300 * (i % 3)));
      }
    });
  for (auto& s : submitters) s.join();
  // Sample the running count while the requests complete.
  bool all_done = false;
  while (!all_done) {
    peak = std::max(peak.load(), engine.stats().running);
    all_done = sink.wait(outs, 0.001);
    if (!all_done && !engine.failure().empty()) break;
  }
  // The engine's own record: on a fast CPU the tiny model's requests can finish between the
  // samples above.
  peak = std::max(peak.load(), engine.stats().running_peak);
  EXPECT_TRUE(sink.wait(outs, 50)) << engine.failure();
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Outcome o = sink.get(outs[i]);
    EXPECT_EQ(o.tokens, want[i]) << "request " << i << " (prompt of " << prompts[i].size()
                                 << " tokens)";
    EXPECT_EQ(o.finish.completion_tokens, static_cast<int64_t>(want[i].size())) << i;
    EXPECT_EQ(o.finish.prompt_tokens, static_cast<int64_t>(prompts[i].size())) << i;
    EXPECT_EQ(o.finish.reason, static_cast<int64_t>(want[i].size()) == max_tokens[i]
                                   ? FinishReason::Length
                                   : FinishReason::Stop)
        << i;
  }
  return peak.load();
}

TEST(ServeEngine, ConcurrentGreedyRequestsMatchGenerate) {
  Watchdog dog;
  const auto prompts = testing::mixed_prompts(16, 40, 11);
  std::vector<int64_t> max_tokens;
  for (size_t i = 0; i < prompts.size(); ++i) max_tokens.push_back(1 + (i * 7) % 24);
  // With EOS on: some requests stop early, and the reference says which.
  const auto want = testing::reference(prompts, max_tokens, /*ignore_eos=*/false);
  ServeConfig c = testing::stories_config();
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
  const int64_t peak = run_and_compare(*engine, prompts, max_tokens, want, 4, false);
  EXPECT_GT(peak, 1) << "requests never ran together";
  const EngineStats s = engine->stats();
  EXPECT_EQ(s.requests_finished_total, 16);
  EXPECT_EQ(s.running, 0);
  EXPECT_GE(s.running_peak, 2);
  EXPECT_LE(s.running_peak, c.max_num_seqs);
  EXPECT_EQ(s.waiting, 0);
  EXPECT_EQ(s.kv_blocks_used, 0);
  int64_t prompt_total = 0, gen_min = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    prompt_total += static_cast<int64_t>(prompts[i].size());
    gen_min += static_cast<int64_t>(want[i].size());
  }
  EXPECT_EQ(s.prompt_tokens_total, prompt_total);
  EXPECT_GE(s.generation_tokens_total, gen_min);  // EOS tokens are sampled, not reported
  EXPECT_EQ(s.preemptions_total, 0);
  engine->shutdown();
  EXPECT_FALSE(engine->ready());
  EXPECT_TRUE(engine->failure().empty()) << engine->failure();
}

class ServeLayouts : public ::testing::TestWithParam<Layout> {};

TEST_P(ServeLayouts, GreedyMatchesGenerate) {
  Watchdog dog;
  const Layout l = GetParam();
  const auto prompts = testing::mixed_prompts(10, 30, 5 + l.tp * 3 + l.pp);
  std::vector<int64_t> max_tokens;
  for (size_t i = 0; i < prompts.size(); ++i) max_tokens.push_back(2 + (i * 5) % 14);
  const auto want = testing::reference(prompts, max_tokens, true);
  ServeConfig c = testing::stories_config(l.tp, l.pp);
  c.dp = l.dp;
  c.pp_split = l.split ? "on" : "auto";
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
  EXPECT_EQ(engine->stats().kv_blocks_total, l.dp * testing::stories_config().max_num_seqs *
                                                 (c.max_model_len / c.block_size));
  const int64_t peak = run_and_compare(*engine, prompts, max_tokens, want, 3);
  EXPECT_GT(peak, 1);
  EXPECT_EQ(engine->stats().kv_blocks_used, 0);
  engine->shutdown();
  EXPECT_TRUE(engine->failure().empty()) << engine->failure();
}

INSTANTIATE_TEST_SUITE_P(Threads, ServeLayouts,
                         ::testing::Values(Layout{2, 1, 1}, Layout{1, 2, 1}, Layout{2, 2, 1},
                                           Layout{2, 2, 1, true}, Layout{1, 1, 2}),
                         [](const auto& info) {
                           return "tp" + std::to_string(info.param.tp) + "_pp" +
                                  std::to_string(info.param.pp) + "_dp" +
                                  std::to_string(info.param.dp) +
                                  (info.param.split ? "_split" : "");
                         });

TEST(ServeEngine, SeededSamplingIsTheSameAloneAndUnderLoad) {
  Watchdog dog;
  const std::vector<int32_t> prompt = {1, 403, 29, 77};
  SamplingParams sp{0.9f, 40, 0.95f, 1234};
  const auto want = testing::reference({prompt}, {20}, true, sp)[0];
  ServeConfig c = testing::stories_config(2, 1);
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
  GenParams g;
  g.max_tokens = 20;
  g.temperature = sp.temperature;
  g.top_k = sp.top_k;
  g.top_p = sp.top_p;
  g.seed = sp.seed;
  g.ignore_eos = true;
  Sink sink;
  std::shared_ptr<Outcome> alone;
  sink.submit(*engine, prompt, g, &alone);
  ASSERT_TRUE(sink.wait({alone}));
  EXPECT_EQ(sink.get(alone).tokens, want) << "alone";
  // Under load: other sampled and greedy requests around it, submitted before and after.
  std::vector<std::shared_ptr<Outcome>> outs(7);
  const auto others = testing::mixed_prompts(6, 20, 3);
  for (int i = 0; i < 3; ++i) {
    GenParams o = g;
    o.seed = 99 + i;
    o.temperature = i == 0 ? 0.0f : 1.2f;
    sink.submit(*engine, others[i], o, &outs[i]);
  }
  sink.submit(*engine, prompt, g, &outs[3]);
  for (int i = 3; i < 6; ++i) {
    GenParams o = g;
    o.seed = 7 + i;
    o.top_k = 0;
    sink.submit(*engine, others[i], o, &outs[i + 1]);
  }
  ASSERT_TRUE(sink.wait(outs));
  EXPECT_EQ(sink.get(outs[3]).tokens, want) << "under load";
  engine->shutdown();
}

TEST(ServeEngine, LogprobsAreTheLogSoftmaxOfTheLogits) {
  Watchdog dog;
  const std::vector<int32_t> prompt = {1, 45, 300, 12};
  std::vector<std::vector<std::vector<float>>> logits;
  const auto want = testing::reference({prompt}, {6}, true, {}, &logits)[0];
  for (int tp : {1, 2}) {
    ServeConfig c = testing::stories_config(tp, 1);
    auto engine = make_serve_engine(c);
    ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
    GenParams g;
    g.max_tokens = 6;
    g.temperature = 0;
    g.ignore_eos = true;
    g.top_logprobs = 3;
    Sink sink;
    std::shared_ptr<Outcome> o;
    sink.submit(*engine, prompt, g, &o);
    ASSERT_TRUE(sink.wait({o}));
    const Outcome got = sink.get(o);
    ASSERT_EQ(got.tokens, want);
    for (size_t s = 0; s < got.events.size(); ++s) {
      const std::vector<float>& row = logits[0][s];
      double m = -INFINITY, z = 0;
      for (float v : row) m = std::max(m, static_cast<double>(v));
      for (float v : row) z += std::exp(v - m);
      const double lse = m + std::log(z);
      const TokenEvent& e = got.events[s];
      EXPECT_NEAR(e.logprob, row[e.token] - lse, 1e-4) << "tp " << tp << " step " << s;
      ASSERT_EQ(e.top.size(), 3u);
      EXPECT_EQ(e.top[0].token, e.token) << "greedy picks the most likely token";
      EXPECT_FLOAT_EQ(e.top[0].logprob, e.logprob);
      for (const TokenLogprob& t : e.top) EXPECT_NEAR(t.logprob, row[t.token] - lse, 1e-4);
      EXPECT_GE(e.top[1].logprob, e.top[2].logprob);
    }
    engine->shutdown();
  }
}

TEST(ServeEngine, TinyKvCachePreemptsAndStillMatches) {
  Watchdog dog;
  const auto prompts = testing::mixed_prompts(8, 24, 21);
  std::vector<int64_t> max_tokens(prompts.size(), 16);
  const auto want = testing::reference(prompts, max_tokens, true);
  ServeConfig c = testing::stories_config(1, 2);
  // 12 blocks of 4 positions: one request needs up to 10, so several cannot grow together.
  c.kv_cache_memory = serve_kv_layout(c).block_bytes * 12;
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
  EXPECT_EQ(engine->stats().kv_blocks_total, 12);
  run_and_compare(*engine, prompts, max_tokens, want, 2);
  const EngineStats s = engine->stats();
  EXPECT_GT(s.preemptions_total, 0);
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.requests_finished_total, 8);
  // A request that can never fit is refused at once, naming the parameter.
  GenParams g;
  g.max_tokens = 60;
  EXPECT_THROW(engine->submit({{1, 2, 3}, g}, {}), std::invalid_argument);
  engine->shutdown();
}

TEST(ServeEngine, PrefixCachingHitsAndChangesNothing) {
  Watchdog dog;
  std::vector<int32_t> prefix = {1};
  for (int i = 0; i < 23; ++i) prefix.push_back(100 + 13 * i % 400);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 5; ++i) {
    std::vector<int32_t> p = prefix;
    for (int k = 0; k <= i; ++k) p.push_back(200 + 31 * i + k);
    prompts.push_back(p);
  }
  prompts.push_back(prompts[2]);  // the same prompt again
  std::vector<int64_t> max_tokens(prompts.size(), 8);
  const auto want = testing::reference(prompts, max_tokens, true);
  for (int pp : {1, 2}) {
    ServeConfig c = testing::stories_config(1, pp);
    c.enable_prefix_caching = true;
    auto engine = make_serve_engine(c);
    ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
    Sink sink;
    GenParams g;
    g.max_tokens = 8;
    g.temperature = 0;
    g.ignore_eos = true;
    std::shared_ptr<Outcome> first;
    sink.submit(*engine, prompts[0], g, &first);
    ASSERT_TRUE(sink.wait({first}));
    EXPECT_EQ(sink.get(first).tokens, want[0]);
    std::vector<std::shared_ptr<Outcome>> outs(prompts.size());
    for (size_t i = 1; i < prompts.size(); ++i) sink.submit(*engine, prompts[i], g, &outs[i]);
    outs.erase(outs.begin());
    ASSERT_TRUE(sink.wait(outs));
    for (size_t i = 1; i < prompts.size(); ++i)
      EXPECT_EQ(sink.get(outs[i - 1]).tokens, want[i]) << "pp " << pp << " request " << i;
    const EngineStats s = engine->stats();
    // The 24-token prefix is 6 full blocks: every later request finds them (at least 5 x 5).
    EXPECT_GE(s.prefix_cache_hits_total, 25) << "pp " << pp;
    EXPECT_LE(s.prefix_cache_hits_total, s.prefix_cache_queries_total);
    int64_t prompt_total = 0;
    for (const auto& p : prompts) prompt_total += static_cast<int64_t>(p.size());
    EXPECT_EQ(s.prompt_tokens_total, prompt_total - 4 * s.prefix_cache_hits_total)
        << "hits are not computed";
    EXPECT_EQ(s.kv_blocks_used, 0);
    engine->shutdown();
  }
}

TEST(ServeEngine, CancelFreesBlocksAtOnce) {
  Watchdog dog;
  ServeConfig c = testing::stories_config(1, 2);
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
  Sink sink;
  GenParams g;
  g.max_tokens = 200;
  g.temperature = 0;
  g.ignore_eos = true;
  std::vector<std::shared_ptr<Outcome>> outs(4);
  std::vector<uint64_t> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(sink.submit(*engine, {1, 50, 60 + i}, g, &outs[i]));
  // Wait until each has generated a few tokens.
  for (int spin = 0; spin < 20000; ++spin) {
    bool going = true;
    for (auto& o : outs) going = going && sink.get(o).tokens.size() >= 3;
    if (going) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_GT(engine->stats().kv_blocks_used, 0);
  for (uint64_t id : ids) engine->cancel(id);
  engine->cancel(987654);  // unknown: ignored
  ASSERT_TRUE(sink.wait(outs, 10));
  for (auto& o : outs) {
    const Outcome got = sink.get(o);
    EXPECT_EQ(got.finish.reason, FinishReason::Cancelled);
    EXPECT_LT(got.tokens.size(), 200u);
    EXPECT_EQ(got.finish.completion_tokens, static_cast<int64_t>(got.tokens.size()));
  }
  const EngineStats s = engine->stats();
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.kv_usage, 0.0);
  EXPECT_EQ(s.running, 0);
  EXPECT_EQ(s.waiting, 0);
  engine->shutdown();
}

TEST(ServeEngine, ShortRequestFinishesDuringALongOne) {
  Watchdog dog;
  ServeConfig c = testing::stories_config(1, 1);
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
  Sink sink;
  GenParams g;
  g.max_tokens = 220;
  g.temperature = 0;
  g.ignore_eos = true;
  std::shared_ptr<Outcome> long_one, short_one;
  sink.submit(*engine, {1, 33}, g, &long_one);
  while (sink.get(long_one).tokens.size() < 2)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  g.max_tokens = 3;
  sink.submit(*engine, {1, 34, 35, 36, 37, 38, 39, 40}, g, &short_one);
  ASSERT_TRUE(sink.wait({long_one, short_one}));
  EXPECT_LT(sink.get(short_one).finish_order, sink.get(long_one).finish_order);
  EXPECT_EQ(sink.get(long_one).tokens.size(), 220u);
  engine->shutdown();
}

TEST(ServeEngine, ShutdownCancelsRunningRequestsAndEndsEveryRank) {
  Watchdog dog;
  ServeConfig c = testing::stories_config(2, 2);
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine)) << engine->failure();
  Sink sink;
  GenParams g;
  g.max_tokens = 200;
  g.ignore_eos = true;
  std::vector<std::shared_ptr<Outcome>> outs(5);
  for (int i = 0; i < 5; ++i) sink.submit(*engine, {1, 70 + i}, g, &outs[i]);
  while (sink.get(outs[0]).tokens.empty())
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  engine->shutdown();  // returns only when every rank left
  EXPECT_FALSE(engine->ready());
  ASSERT_TRUE(sink.wait(outs, 1));
  for (auto& o : outs) EXPECT_EQ(sink.get(o).finish.reason, FinishReason::Cancelled);
  engine->shutdown();  // idempotent
  std::shared_ptr<Outcome> late;
  EXPECT_THROW(sink.submit(*engine, {1}, g, &late), std::runtime_error);
  EXPECT_TRUE(engine->failure().empty()) << engine->failure();
}

TEST(ServeEngine, BadRequestsAndConfigsAreRefusedNamingTheParameter) {
  Watchdog dog;
  ServeConfig c = testing::stories_config();
  auto engine = make_serve_engine(c);
  auto refuse = [&](std::vector<int32_t> prompt, GenParams g, const std::string& name) {
    try {
      engine->submit({std::move(prompt), g}, {});
      ADD_FAILURE() << "accepted; expected a refusal naming " << name;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  GenParams ok;
  refuse({}, ok, "prompt");
  refuse({1, 512}, ok, "prompt");
  GenParams g = ok;
  g.max_tokens = 0;
  refuse({1}, g, "max_tokens");
  g = ok;
  g.max_tokens = 256;
  refuse({1}, g, "max_model_len");
  g = ok;
  g.temperature = -1;
  refuse({1}, g, "temperature");
  g = ok;
  g.top_p = 0;
  refuse({1}, g, "top_p");
  g = ok;
  g.top_k = -2;
  refuse({1}, g, "top_k");
  g = ok;
  g.top_logprobs = 21;
  refuse({1}, g, "top_logprobs");
  engine->shutdown();
  ServeConfig bad = c;
  bad.max_model_len = 100000;
  EXPECT_THROW(make_serve_engine(bad), std::invalid_argument);
  bad = c;
  bad.kv_cache_memory = 1;
  EXPECT_THROW(make_serve_engine(bad), std::invalid_argument);
  bad = c;
  bad.tp = 3;  // 8 query heads, 4 KV heads
  EXPECT_THROW(make_serve_engine(bad), std::invalid_argument);
}

TEST(ServeEngine, ALoadFailureIsReportedNotHung) {
  Watchdog dog;
  ServeConfig c = testing::stories_config();
  c.dtype = "f64";  // refused while the ranks start, after make_serve_engine returned
  auto engine = make_serve_engine(c);
  Sink sink;
  GenParams g;
  std::shared_ptr<Outcome> early;
  try {
    sink.submit(*engine, {1, 2}, g, &early);
  } catch (const std::runtime_error&) {
    early = nullptr;  // the failure came first
  }
  EXPECT_FALSE(testing::wait_ready(*engine, 20));
  EXPECT_NE(engine->failure().find("dtype"), std::string::npos) << engine->failure();
  if (early) {
    ASSERT_TRUE(sink.wait({early}, 20));
    EXPECT_EQ(sink.get(early).finish.reason, FinishReason::Error);
    EXPECT_FALSE(sink.get(early).finish.error.empty());
  }
  std::shared_ptr<Outcome> late;
  EXPECT_THROW(sink.submit(*engine, {1, 2}, g, &late), std::runtime_error);
  engine->shutdown();
}

// A measurement, not a check (disabled; prints only): output tokens/s of 1, 4 and 16 concurrent
// greedy requests on the model in PARALLM_SERVE_BENCH_MODEL (e.g. `parallm init-model --shape
// bench-30m`), PARALLM_SERVE_BENCH_TP / _PP ranks, _THREADS per rank, _N: one concurrency only;
// 64 tokens each after a 32-token prompt.
//   PARALLM_SERVE_BENCH_MODEL=/tmp/m build/tests/test_engine
//     --gtest_also_run_disabled_tests --gtest_filter='*DISABLED_Throughput*'
std::vector<int> bench_sizes() {
  const char* v = std::getenv("PARALLM_SERVE_BENCH_N");
  if (v) return {std::atoi(v)};
  return {1, 4, 16};
}

TEST(ServeEngine, DISABLED_Throughput) {
  const char* path = std::getenv("PARALLM_SERVE_BENCH_MODEL");
  if (!path) GTEST_SKIP() << "set PARALLM_SERVE_BENCH_MODEL";
  auto env = [](const char* name, int def) {
    const char* v = std::getenv(name);
    return v ? std::atoi(v) : def;
  };
  ServeConfig c;
  c.model = path;
  c.tp = env("PARALLM_SERVE_BENCH_TP", 1);
  c.pp = env("PARALLM_SERVE_BENCH_PP", 1);
  c.threads = env("PARALLM_SERVE_BENCH_THREADS", 0);
  c.backend = "local";
  c.max_model_len = 256;
  auto engine = make_serve_engine(c);
  ASSERT_TRUE(testing::wait_ready(*engine, 120)) << engine->failure();
  for (int n : bench_sizes()) {
    Sink sink;
    std::vector<std::shared_ptr<Outcome>> outs(n);
    const auto prompts = testing::mixed_prompts(n, 1, 5);
    GenParams g;
    g.max_tokens = 64;
    g.temperature = 0;
    g.ignore_eos = true;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) {
      std::vector<int32_t> p(32);
      for (int k = 0; k < 32; ++k) p[k] = 1 + (i * 131 + k * 7) % 500;
      sink.submit(*engine, p, g, &outs[i]);
    }
    ASSERT_TRUE(sink.wait(outs, 600));
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[serve bench] tp %d pp %d: %2d concurrent x 64 tokens: %.2f s, %.1f output "
                "tokens/s\n",
                c.tp, c.pp, n, s, n * 64 / s);
    std::fflush(stdout);
  }
  engine->shutdown();
}

}  // namespace
}  // namespace parallm::serve
