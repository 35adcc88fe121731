#include "parallm/plan/workload.h"

#include "parallm/core/error.h"

namespace parallm::plan {

std::string Layout::str() const {
  return cat("tp=", tp, " pp=", pp, " dp=", dp, " ep=", ep);
}

Optimizer parse_optimizer(std::string_view s, std::string_view flag) {
  if (s == "adam" || s == "adamw") return Optimizer::Adam;
  if (s == "sgd") return Optimizer::SGD;
  fail("plan", flag, ": unknown optimizer \"", s, "\" (choose adam, sgd)");
}

}  // namespace parallm::plan
