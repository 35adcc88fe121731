#include "parallm/plan/workload.h"

#include "parallm/core/error.h"

namespace parallm::plan {

std::string Layout::str() const {
  return cat("tp=", tp, " pp=", pp, " dp=", dp, " ep=", ep);
}

std::string_view recompute_name(Recompute r) {
  switch (r) {
    case Recompute::None:
      return "none";
    case Recompute::Selective:
      return "selective";
    case Recompute::Full:
      return "full";
  }
  return "?";
}

Recompute parse_recompute(std::string_view s, std::string_view flag) {
  if (s == "none") return Recompute::None;
  if (s == "selective") return Recompute::Selective;
  if (s == "full") return Recompute::Full;
  fail("plan", flag, ": unknown recompute \"", s, "\" (choose none, selective, full)");
}

Optimizer parse_optimizer(std::string_view s, std::string_view flag) {
  if (s == "adam" || s == "adamw") return Optimizer::Adam;
  if (s == "sgd") return Optimizer::SGD;
  fail("plan", flag, ": unknown optimizer \"", s, "\" (choose adam, sgd)");
}

}  // namespace parallm::plan
