#include "parallm/engine/step_plan.h"

#include "parallm/core/error.h"

namespace parallm {
namespace {
constexpr int kHead = 3, kPerEntry = 4;
}

int64_t StepPlan::tokens() const {
  int64_t t = 0;
  for (const PlanEntry& e : entries) t += e.n_tokens;
  return t;
}

int StepPlan::samples() const {
  int n = 0;
  for (const PlanEntry& e : entries) n += e.sample;
  return n;
}

std::vector<SeqChunk> StepPlan::chunks() const {
  std::vector<SeqChunk> out;
  out.reserve(entries.size());
  for (const PlanEntry& e : entries) out.push_back({e.slot, e.start_pos, e.n_tokens});
  return out;
}

std::vector<int64_t> StepPlan::encode(bool with_ids) const {
  const size_t n_ids = with_ids ? ids.size() : 0;
  std::vector<int64_t> v;
  v.reserve(kHead + kPerEntry * entries.size() + n_ids);
  v.push_back(exit ? 1 : 0);
  v.push_back(static_cast<int64_t>(entries.size()));
  v.push_back(static_cast<int64_t>(n_ids));
  for (const PlanEntry& e : entries) {
    v.push_back(e.slot);
    v.push_back(e.start_pos);
    v.push_back(e.n_tokens);
    v.push_back(e.sample ? 1 : 0);
  }
  for (size_t k = 0; k < n_ids; ++k) v.push_back(ids[k]);
  return v;
}

StepPlan StepPlan::decode(const int64_t* v, size_t n) {
  if (n < static_cast<size_t>(kHead) || v[1] < 0 || v[2] < 0 ||
      static_cast<size_t>(kHead + kPerEntry * v[1] + v[2]) > n)
    fail<std::runtime_error>("step-plan", "malformed plan: ", n, " values, header (",
                             n > 0 ? v[0] : -1, ", ", n > 1 ? v[1] : -1, ", ", n > 2 ? v[2] : -1,
                             ")");
  StepPlan p;
  p.exit = v[0] != 0;
  p.entries.resize(v[1]);
  const int64_t* e = v + kHead;
  for (PlanEntry& entry : p.entries) {
    entry = {static_cast<int>(e[0]), e[1], e[2], e[3] != 0};
    e += kPerEntry;
  }
  p.ids.assign(e, e + v[2]);
  return p;
}

int StepPlan::wire_size(int max_entries, int64_t max_ids) {
  return static_cast<int>(kHead + kPerEntry * static_cast<int64_t>(max_entries) + max_ids);
}

void broadcast_plan(StepPlan& plan, const comm::Group& tp, int root, int max_entries,
                    int64_t max_ids) {
  if (tp.rank() == root && (static_cast<int64_t>(plan.entries.size()) > max_entries ||
                            static_cast<int64_t>(plan.ids.size()) > max_ids))
    fail("step-plan", "plan of ", plan.entries.size(), " entries and ", plan.ids.size(),
         " ids exceeds the limits (", max_entries, " entries, ", max_ids, " ids)");
  if (tp.size() == 1) return;
  std::vector<int64_t> wire(StepPlan::wire_size(max_entries, max_ids), 0);
  if (tp.rank() == root) {
    const std::vector<int64_t> v = plan.encode(true);
    std::copy(v.begin(), v.end(), wire.begin());
  }
  tp.broadcast(wire.data(), wire.size(), DType::I64, root);
  if (tp.rank() != root) plan = StepPlan::decode(wire.data(), wire.size());
}

}  // namespace parallm
