// The serving scheduler's parts without a model: the block manager (reference counts, prefix
// cache by hash chain, LRU eviction), the serve plan's wire form, and the scheduler's policy
// (decodes before prompt chunks, the token budget, one in-flight plan per request, preemption by
// recomputation when blocks run out, the queue limit), driven by hand-made results.
#include <gtest/gtest.h>

#include "parallm/engine/block_manager.h"
#include "parallm/engine/scheduler.h"
#include "parallm/engine/serve_plan.h"

namespace parallm::serve {
namespace {

TEST(ServeBlockManager, ReferenceCountsPrefixHitsAndLruEviction) {
  BlockManager bm(4, 2, true);
  std::vector<int32_t> a;
  ASSERT_TRUE(bm.allocate(3, a));
  EXPECT_EQ(bm.used(), 3);
  std::vector<int32_t> b;
  EXPECT_FALSE(bm.allocate(2, b));  // only one left: nothing taken
  EXPECT_TRUE(b.empty());
  const int32_t t0[2] = {5, 6}, t1[2] = {7, 8};
  const uint64_t h0 = BlockManager::chain_hash(0, t0, 2), h1 = BlockManager::chain_hash(h0, t1, 2);
  EXPECT_NE(h1, BlockManager::chain_hash(0, t1, 2)) << "the chain names the parent";
  bm.register_full(a[0], h0, 0, t0);
  bm.register_full(a[1], h1, h0, t1);
  EXPECT_EQ(bm.lookup(h0, 0, t0), a[0]);  // shared: two references
  bm.release(a);                          // a[0] keeps one reference
  EXPECT_EQ(bm.used(), 1);
  EXPECT_EQ(bm.available(), 3);
  const int32_t other[2] = {7, 9};
  EXPECT_EQ(bm.lookup(h1, h0, other), -1) << "tokens are compared, not only the hash";
  EXPECT_EQ(bm.lookup(h1, 1, t1), -1) << "the parent is compared";
  // Free blocks go first (a[2] and the never used one), then the LRU cached block a[1].
  std::vector<int32_t> c;
  ASSERT_TRUE(bm.allocate(3, c));
  EXPECT_EQ(c[2], a[1]);
  EXPECT_EQ(bm.lookup(h1, h0, t1), -1) << "evicted";
  EXPECT_EQ(bm.used(), 4);
  bm.release(c);
  bm.release({a[0]});
  EXPECT_EQ(bm.used(), 0);
  EXPECT_EQ(bm.lookup(h0, 0, t0), a[0]) << "still cached after release";
}

TEST(ServePlan, WireFormRoundTrips) {
  ServePlan p;
  ServeEntry e;
  e.slot = 3;
  e.start_pos = 17;
  e.n_tokens = 2;
  e.sample = true;
  e.init = true;
  e.sampling = {0.7f, 5, 0.9f, 0xfedcba9876543210ull};
  e.rng_skip = 4;
  e.top_logprobs = 2;
  e.blocks = {9, 4, 1};
  p.entries.push_back(e);
  ServeEntry d;
  d.slot = 1;
  d.start_pos = 5;
  d.n_tokens = 1;
  d.blocks = {};
  p.entries.push_back(d);
  p.ids = {11, 12, 13};
  p.exit = true;
  const auto v = p.encode(true);
  EXPECT_LE(static_cast<int64_t>(v.size()), ServePlan::wire_size(2, 3, 3));
  const ServePlan q = ServePlan::decode(v.data(), v.size());
  ASSERT_EQ(q.entries.size(), 2u);
  EXPECT_EQ(q.entries[0].slot, 3);
  EXPECT_EQ(q.entries[0].start_pos, 17);
  EXPECT_TRUE(q.entries[0].sample && q.entries[0].init);
  EXPECT_EQ(q.entries[0].sampling.temperature, 0.7f);
  EXPECT_EQ(q.entries[0].sampling.top_p, 0.9f);
  EXPECT_EQ(q.entries[0].sampling.top_k, 5);
  EXPECT_EQ(q.entries[0].sampling.seed, 0xfedcba9876543210ull);
  EXPECT_EQ(q.entries[0].rng_skip, 4);
  EXPECT_EQ(q.entries[0].top_logprobs, 2);
  EXPECT_EQ(q.entries[0].blocks, (std::vector<int32_t>{9, 4, 1}));
  EXPECT_FALSE(q.entries[1].sample || q.entries[1].init);
  EXPECT_EQ(q.ids, p.ids);
  EXPECT_TRUE(q.exit);
  const auto no_ids = p.encode(false);
  EXPECT_TRUE(ServePlan::decode(no_ids.data(), no_ids.size()).ids.empty());
  std::vector<int64_t> broken = v;
  broken[2] = 1000;
  EXPECT_THROW(ServePlan::decode(broken.data(), broken.size()), std::runtime_error);
}

SchedulerConfig small(int64_t blocks, int lanes = 1) {
  SchedulerConfig c;
  c.lanes = lanes;
  c.max_num_seqs = 4;
  c.max_num_batched_tokens = 8;
  c.block_size = 4;
  c.num_blocks = blocks;
  c.max_model_len = 64;
  c.max_waiting = 3;
  c.vocab_size = 100;
  c.eos_token_ids = {2};
  return c;
}

GenParams greedy(int64_t max_tokens) {
  GenParams g;
  g.max_tokens = max_tokens;
  g.temperature = 0;
  return g;
}

std::vector<int32_t> seq(int n, int32_t from = 10) {
  std::vector<int32_t> v;
  for (int i = 0; i < n; ++i) v.push_back(from + i);
  return v;
}

// Results for a lane: token 50 for every sampled entry.
void answer(Scheduler& s, int lane) {
  std::vector<int32_t> r(s.result_values(lane), 50);
  s.complete(lane, r.data());
}

TEST(ServeScheduler, DecodesFirstThenPromptChunksWithinTheBudget) {
  Scheduler s(small(64));
  s.submit(1, {seq(3), greedy(5)}, {});
  ServePlan p = s.plan(0);
  ASSERT_EQ(p.entries.size(), 1u);
  EXPECT_TRUE(p.entries[0].init && p.entries[0].sample);
  EXPECT_EQ(p.entries[0].blocks.size(), 1u);
  answer(s, 0);
  s.submit(2, {seq(20), greedy(5)}, {});  // a long prompt: chunked by the budget of 8
  p = s.plan(0);
  ASSERT_EQ(p.entries.size(), 2u);
  EXPECT_EQ(p.entries[0].n_tokens, 1) << "the running decode first";
  EXPECT_EQ(p.entries[0].start_pos, 3);
  EXPECT_EQ(p.entries[1].n_tokens, 7) << "then a chunk of what the budget leaves";
  EXPECT_FALSE(p.entries[1].sample);
  EXPECT_EQ(p.tokens(), 8);
  answer(s, 0);
  p = s.plan(0);
  ASSERT_EQ(p.entries.size(), 2u);
  EXPECT_EQ(p.entries[1].start_pos, 7);
  EXPECT_EQ(p.entries[1].n_tokens, 7);
  EXPECT_FALSE(p.entries[1].init);
  EXPECT_EQ(s.stats().running, 2);
}

TEST(ServeScheduler, ARequestIsInOneInFlightPlanOnly) {
  Scheduler s(small(64, 2));
  s.submit(1, {seq(2), greedy(4)}, {});
  ServePlan p0 = s.plan(0);
  EXPECT_EQ(p0.entries.size(), 1u);
  ServePlan p1 = s.plan(1);  // lane 0 still in flight
  EXPECT_TRUE(p1.entries.empty());
  answer(s, 1);
  answer(s, 0);
  p0 = s.plan(0);
  EXPECT_EQ(p0.entries.size(), 1u);
  EXPECT_EQ(p0.entries[0].start_pos, 2);
}

TEST(ServeScheduler, PreemptsByRecomputationWhenBlocksRunOut) {
  Scheduler s(small(4));  // 16 positions
  std::vector<int32_t> tokens_a, tokens_b;
  RequestCallbacks ca, cb;
  FinishReason fa = FinishReason::Error, fb = FinishReason::Error;
  ca.on_token = [&](const TokenEvent& e) { tokens_a.push_back(e.token); };
  ca.on_finish = [&](const FinishEvent& f) { fa = f.reason; };
  cb.on_token = [&](const TokenEvent& e) { tokens_b.push_back(e.token); };
  cb.on_finish = [&](const FinishEvent& f) { fb = f.reason; };
  s.submit(1, {seq(7), greedy(8)}, ca);
  s.submit(2, {seq(7, 30), greedy(8)}, cb);
  int64_t preempted_init = -1;
  for (int step = 0; step < 60 && (fa == FinishReason::Error || fb == FinishReason::Error);
       ++step) {
    ServePlan p = s.plan(0);
    for (const ServeEntry& e : p.entries)
      if (e.init && e.start_pos == 0 && e.n_tokens > 7) preempted_init = e.n_tokens;
    answer(s, 0);
    EXPECT_LE(s.stats().kv_blocks_used, 4);
  }
  EXPECT_EQ(fa, FinishReason::Length);
  EXPECT_EQ(fb, FinishReason::Length);
  EXPECT_EQ(tokens_a.size(), 8u);
  EXPECT_EQ(tokens_b.size(), 8u);
  EXPECT_GT(s.stats().preemptions_total, 0);
  EXPECT_GT(preempted_init, 7) << "a preempted request restarts with its generated tokens";
  EXPECT_EQ(s.stats().kv_blocks_used, 0);
}

TEST(ServeScheduler, QueueLimitAndEos) {
  Scheduler s(small(64));
  for (uint64_t id = 1; id <= 3; ++id) s.submit(id, {seq(2), greedy(4)}, {});
  EXPECT_THROW(s.submit(4, {seq(2), greedy(4)}, {}), QueueFull);
  EXPECT_EQ(s.stats().waiting, 3);
  FinishEvent fin;
  RequestCallbacks cb;
  cb.on_finish = [&](const FinishEvent& f) { fin = f; };
  s.plan(0);
  EXPECT_EQ(s.stats().running, 3);
  s.submit(5, {seq(2), greedy(4)}, cb);
  answer(s, 0);
  ServePlan p = s.plan(0);
  ASSERT_EQ(p.entries.size(), 4u);
  std::vector<int32_t> eos(s.result_values(0), 2);  // EOS for everyone
  s.complete(0, eos.data());
  EXPECT_EQ(fin.reason, FinishReason::Stop);
  EXPECT_EQ(fin.completion_tokens, 0);  // EOS is not reported
  EXPECT_EQ(s.stats().running, 0);
  EXPECT_EQ(s.stats().requests_finished_total, 4);
}

}  // namespace
}  // namespace parallm::serve
