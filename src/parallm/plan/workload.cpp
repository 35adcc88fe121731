#include "parallm/plan/workload.h"

#include "parallm/core/error.h"

namespace parallm::plan {

std::string Layout::str() const {
  if (experts_over_tp) return cat("tp=", tp, " pp=", pp, " dp=", dp, " ep=tp");
  return cat("tp=", tp, " pp=", pp, " dp=", dp, " ep=", ep);
}

std::string Layout::engine_flags() const {
  if (ep > 1 && dp != ep) return "";
  std::string f;
  auto add = [&f](const std::string& s) { f += (f.empty() ? "" : " ") + s; };
  if (tp > 1) add(cat("--tp ", tp));
  if (pp > 1) add(cat("--pp ", pp));
  if (ep > 1) add(cat("--ep ", ep));
  if (experts_over_tp) add("--enable-expert-parallel");
  if (ep == 1 && dp > 1) add(cat("--dp ", dp));
  return f;
}

Optimizer parse_optimizer(std::string_view s, std::string_view flag) {
  if (s == "adam" || s == "adamw") return Optimizer::Adam;
  if (s == "sgd") return Optimizer::SGD;
  fail("plan", flag, ": unknown optimizer \"", s, "\" (choose adam, sgd)");
}

}  // namespace parallm::plan
