// Helpers of the serving tests: a watchdog (no test can hang), request sinks that collect each
// request's events, and the reference tokens of run_generation (the `parallm generate` loop) for
// one prompt alone on one rank.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/engine/batch_generate.h"
#include "parallm/engine/runtime.h"
#include "parallm/engine/serve_engine.h"
#include "parallm/model/weights.h"

namespace parallm::serve::testing {

inline std::string stories() {
  return std::string(PARALLM_SOURCE_DIR) + "/models/stories260K/stories260K.bin";
}

// Ends the process (a failure) when the scope lasts longer than `seconds`.
class Watchdog {
 public:
  explicit Watchdog(double seconds = 60) {
    thread_ = std::thread([this, seconds] {
      std::unique_lock<std::mutex> lock(mu_);
      if (!cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return done_; })) {
        std::fprintf(stderr, "watchdog: %s.%s ran past %.0f s: aborting\n",
                     ::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name(),
                     ::testing::UnitTest::GetInstance()->current_test_info()->name(), seconds);
        std::fflush(stderr);
        std::_Exit(3);
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// What one request received.
struct Outcome {
  std::vector<int32_t> tokens;
  std::vector<TokenEvent> events;
  FinishEvent finish;
  bool done = false;
  int finish_order = -1;  // order among the sink's finished requests
};

class Sink {
 public:
  // Callbacks that record into a new Outcome.
  std::pair<std::shared_ptr<Outcome>, RequestCallbacks> make() {
    auto o = std::make_shared<Outcome>();
    RequestCallbacks cb;
    cb.on_token = [this, o](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      o->tokens.push_back(e.token);
      o->events.push_back(e);
    };
    cb.on_finish = [this, o](const FinishEvent& f) {
      // Notified under the lock: a waiter may destroy the sink as soon as it sees `done`.
      std::lock_guard<std::mutex> lock(mu_);
      EXPECT_FALSE(o->done) << "on_finish called twice";
      o->finish = f;
      o->done = true;
      o->finish_order = finished_++;
      cv_.notify_all();
    };
    return {o, cb};
  }
  uint64_t submit(ServeEngine& e, std::vector<int32_t> prompt, GenParams p,
                  std::shared_ptr<Outcome>* out) {
    auto [o, cb] = make();
    *out = o;
    return e.submit({std::move(prompt), p}, cb);
  }
  // Waits until every outcome is done (false after `seconds`).
  bool wait(const std::vector<std::shared_ptr<Outcome>>& all, double seconds = 50) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] {
      for (const auto& o : all)
        if (!o->done) return false;
      return true;
    });
  }
  // Snapshot under the lock.
  Outcome get(const std::shared_ptr<Outcome>& o) {
    std::lock_guard<std::mutex> lock(mu_);
    return *o;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int finished_ = 0;
};

// Tokens run_generation gives each prompt alone on one rank (EOS stripped: the engine does not
// report it), with `sampling`; logits of every step when `logits` is given.
inline std::vector<std::vector<int32_t>> reference(
    const std::vector<std::vector<int32_t>>& prompts, const std::vector<int64_t>& max_tokens,
    bool ignore_eos, SamplingParams sampling = {},
    std::vector<std::vector<std::vector<float>>>* logits = nullptr) {
  std::vector<std::vector<int32_t>> out(prompts.size());
  if (logits) logits->assign(prompts.size(), {});
  EngineOptions eo;
  eo.model = stories();
  eo.backend = "local";
  eo.threads = 1;
  run_model(eo, [&](RankContext& ctx) {
    for (size_t i = 0; i < prompts.size(); ++i) {
      BatchOptions bo;
      bo.max_tokens = max_tokens[i];
      bo.ignore_eos = ignore_eos;
      bo.sampling = sampling;
      bo.collect_logits = logits != nullptr;
      BatchResult r =
          run_generation(ctx.model, ctx.tp, ctx.mesh.pp(), {Request{prompts[i], -1}}, bo);
      std::vector<int32_t> t = r.sequences[0].tokens;
      if (r.sequences[0].stopped_at_eos) t.pop_back();
      out[i] = t;
      if (logits) (*logits)[i] = r.sequences[0].logits;
    }
  });
  return out;
}

// Prompts of mixed lengths from a fixed seed (ids in [1, 500)).
inline std::vector<std::vector<int32_t>> mixed_prompts(int n, int max_len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int32_t>> p(n);
  for (int i = 0; i < n; ++i) {
    const int len = 1 + static_cast<int>(rng() % max_len);
    p[i].push_back(1);  // BOS
    for (int k = 1; k < len; ++k) p[i].push_back(static_cast<int32_t>(1 + rng() % 499));
  }
  return p;
}

inline ServeConfig stories_config(int tp = 1, int pp = 1) {
  ServeConfig c;
  c.model = stories();
  c.tp = tp;
  c.pp = pp;
  c.threads = 1;
  c.backend = "local";
  c.comm_timeout_s = 60;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 24;
  c.block_size = 4;
  c.max_model_len = 256;
  c.idle_tick_s = 0.2;
  return c;
}

// Waits until the engine is ready (false after `seconds`).
inline bool wait_ready(const ServeEngine& e, double seconds = 30) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!e.ready()) {
    if (!e.failure().empty() || std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

}  // namespace parallm::serve::testing
