#include "parallm/parallel/train_mode.h"

#include "parallm/core/error.h"

namespace parallm::parallel {

const char* recompute_name(Recompute r) {
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
  fail(flag, "\"", s, "\" is not a recomputation mode (none, selective, full)");
}

}  // namespace parallm::parallel
