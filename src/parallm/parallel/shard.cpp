#include "parallm/parallel/shard.h"

#include <vector>

#include "parallm/core/error.h"

namespace parallm::parallel {
namespace {

bool fits(int64_t q, int64_t kv, int64_t tp) {
  if (tp < 1 || q % tp != 0) return false;
  return kv % tp == 0 || tp % kv == 0;
}

}  // namespace

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
  p.q_heads = q_heads / tp;
  p.q_begin = p.q_heads * rank;
  if (kv_heads >= tp) {
    p.kv_heads = kv_heads / tp;
    p.kv_begin = p.kv_heads * rank;
  } else {
    p.kv_heads = 1;
    p.kv_begin = rank / (tp / kv_heads);
  }
  return p;
}

}  // namespace parallm::parallel
