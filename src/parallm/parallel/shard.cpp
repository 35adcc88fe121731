#include "parallm/parallel/shard.h"

#include <algorithm>
#include <string>
#include <vector>

#include "parallm/core/error.h"

namespace parallm::parallel {
bool HeadPlan::fits(int64_t q, int64_t kv, int tp) {
  if (tp < 1 || q % tp != 0) return false;
  return kv % tp == 0 || tp % kv == 0;
}

FusedShardSpec FusedShardSpec::single(std::string name, ShardSpec rows, int replicas) {
  return {{FusedPart{std::move(name), rows, replicas}}};
}

int64_t FusedShardSpec::size() const {
  int64_t n = 0;
  for (const FusedPart& p : parts) n += p.rows.size();
  return n;
}

int64_t FusedShardSpec::full() const {
  int64_t n = 0;
  for (const FusedPart& p : parts) n += p.rows.full;
  return n;
}

int64_t FusedShardSpec::offset(size_t i) const {
  if (i > parts.size())
    fail("parallel", "fused part ", i, " of a weight with ", parts.size(), " parts");
  int64_t n = 0;
  for (size_t k = 0; k < i; ++k) n += parts[k].rows.size();
  return n;
}

size_t FusedShardSpec::index(std::string_view name) const {
  for (size_t i = 0; i < parts.size(); ++i)
    if (parts[i].name == name) return i;
  std::vector<std::string> have;
  for (const FusedPart& p : parts) have.push_back(p.name);
  fail("parallel", "fused weight has no part \"", name, "\" (parts: ", join(have, ", "), ")");
}

const FusedPart& FusedShardSpec::part(std::string_view name) const {
  return parts[index(name)];
}

std::string HeadPlan::valid_sizes(int64_t q_heads, int64_t kv_heads) {
  std::vector<int64_t> ok;
  for (int64_t t = 1; t <= q_heads; ++t)
    if (fits(q_heads, kv_heads, t)) ok.push_back(t);
  return join(ok, ", ");
}

HeadPlan HeadPlan::make(int64_t q_heads, int64_t kv_heads, int tp, int rank) {
  if (!fits(q_heads, kv_heads, tp))
    fail("tp", "tensor-parallel size ", tp, " does not fit ", q_heads, " query heads and ",
         kv_heads,
         " KV heads (it must divide the query heads, and divide or be a multiple of the "
         "KV heads); sizes that work: ",
         valid_sizes(q_heads, kv_heads));
  HeadPlan p;
  p.q_total = q_heads;
  p.kv_total = kv_heads;
  p.q_heads = q_heads / tp;
  p.q_begin = p.q_heads * rank;
  if (kv_heads >= tp) {
    p.kv_heads = kv_heads / tp;
    p.kv_begin = p.kv_heads * rank;
  } else {
    p.kv_heads = 1;
    p.kv_replicas = static_cast<int>(tp / kv_heads);
    p.kv_begin = rank / p.kv_replicas;
  }
  return p;
}

// ---- expert placement (mixture of experts, parallel/moe.h) ----

std::string moe_ep_problem(int64_t experts, int ep) {
  if (ep < 1) return cat("expert-parallel size must be >= 1, got ", ep);
  if (experts < 1) return cat("--ep ", ep, " needs a mixture-of-experts model (this one is dense)");
  if (ep > experts)
    return cat("--ep ", ep, " exceeds the model's ", experts,
               " experts (each expert-parallel rank needs at least one expert)");
  return "";
}

ShardSpec expert_range(int64_t experts, int ep, int ep_rank) {
  const std::string why = moe_ep_problem(experts, ep);
  if (!why.empty()) fail("moe", why);
  if (ep_rank < 0 || ep_rank >= ep) fail("moe", "expert-parallel rank ", ep_rank, " of ", ep);
  const int64_t q = experts / ep, rem = experts % ep;
  const int64_t begin = ep_rank * q + std::min<int64_t>(ep_rank, rem);
  return {experts, begin, begin + q + (ep_rank < rem ? 1 : 0)};
}

int expert_owner(int64_t expert, int64_t experts, int ep) {
  const int64_t q = experts / ep, rem = experts % ep;
  // The first rem ranks hold q + 1 experts each.
  const int64_t big = rem * (q + 1);
  return static_cast<int>(expert < big ? expert / (q + 1) : rem + (expert - big) / q);
}

}  // namespace parallm::parallel
