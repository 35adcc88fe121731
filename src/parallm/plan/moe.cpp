#include "parallm/plan/moe.h"

#include "parallm/core/error.h"
#include "parallm/parallel/moe.h"
#include "parallm/parallel/shard.h"
#include "parallm/pipeline/partition.h"

namespace parallm::plan {
namespace {

void check(const ModelConfig& c, int ep, int64_t T) {
  if (!c.is_moe()) fail("plan", "EP all-to-all bytes need a mixture-of-experts model");
  if (std::string why = parallel::moe_ep_problem(c.num_local_experts, ep); !why.empty())
    fail("plan", why);
  if (T < 0) fail("plan", "tokens per step must be >= 0, got ", T);
}

}  // namespace

double moe_expected_off_rank_rows(const ModelConfig& c, int ep, int64_t T) {
  check(c, ep, T);
  const double E = double(c.num_local_experts);
  double off = 0;
  for (int r = 0; r < ep; ++r) {
    const double mine = double(parallel::expert_range(c.num_local_experts, ep, r).size());
    off += double(parallel::ShardSpec::even(T, ep, r).size()) * double(c.num_experts_per_tok) *
           (1 - mine / E);
  }
  return off;
}

MoeStepBytes moe_step_bytes(const ModelConfig& c, int ep, int64_t T, double off_rank_rows) {
  check(c, ep, T);
  const double off = off_rank_rows < 0 ? moe_expected_off_rank_rows(c, ep, T) : off_rank_rows;
  const double H = double(c.hidden_size), P = ep;
  MoeStepBytes b;
  if (ep == 1) return b;  // a group of one sends nothing
  b.counts = P * (P - 1) * 8;
  b.dispatch = off * (H + 2) * 4;
  b.combine = off * H * 4;
  b.gather = P * (P - 1) * double(parallel::ShardSpec::max_size(T, ep)) * H * 4;
  return b;
}

int64_t moe_layers(const ModelConfig& c, int64_t layer_begin, int64_t layer_end) {
  int64_t n = 0;
  for (int64_t i = layer_begin; i < layer_end; ++i) n += c.layer_is_moe(i) ? 1 : 0;
  return n;
}

int64_t stage_moe_layers(const ModelConfig& c, int pp, int stage) {
  const pipeline::StageLayers s = pipeline::partition_layers(c.num_hidden_layers, pp).at(stage);
  return moe_layers(c, s.begin, s.end);
}

MoeStepBytes moe_run_bytes(const ModelConfig& c, int ep, const std::vector<int64_t>& step_tokens,
                           int64_t layers, double off_rank_rows) {
  MoeStepBytes sum;
  for (int64_t T : step_tokens) {
    // Off-rank rows are given for the whole run; each step's share does not matter (linear).
    const MoeStepBytes s = moe_step_bytes(c, ep, T, 0);
    sum.counts += s.counts * double(layers);
    sum.gather += s.gather * double(layers);
  }
  const MoeStepBytes rows = moe_step_bytes(c, ep, 0, off_rank_rows);
  sum.dispatch = rows.dispatch;
  sum.combine = rows.combine;
  return sum;
}

MoeAllReduceBytes moe_all_reduce_step_bytes(const ModelConfig& c, int tp, int64_t T) {
  check(c, tp, T);
  MoeAllReduceBytes b;
  if (tp == 1 || T == 0) return b;
  const uint64_t payload = uint64_t(T) * uint64_t(c.num_experts_per_tok) *
                           uint64_t(c.hidden_size) * sizeof(float);
  b.payload = double(payload);
  b.sent = double(2 * uint64_t(tp - 1) * (payload / uint64_t(tp)));
  return b;
}

}  // namespace parallm::plan
