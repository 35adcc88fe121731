// Stop strings on streamed text: finds the first occurrence of any stop string in the text a
// request produces, even when it spans several tokens, and holds back the tail that could still
// become one so a streaming client never sees part of a stop string.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace parallm::server {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops = {}) : stops_(std::move(stops)) {}

  // Appends `text` (whole UTF-8 characters) and returns what may be shown now: everything up to
  // a stop string (then stopped() is true and later calls return ""), or everything but the
  // longest tail that is a prefix of some stop string.
  std::string push(std::string_view text);
  // The held-back tail, at the end of a generation that did not stop on a string.
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace parallm::server
