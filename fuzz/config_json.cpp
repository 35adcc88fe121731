// Fuzzes ModelConfig parsing (model/config.h) the way ModelConfig::from_file does it: bounded
// JSON parse, then from_json (which validates). A config that parses must also survive what the
// loaders do next with it: its parameter count and a round trip through to_json.
#include "fuzz_main.h"
#include "parallm/core/json_limits.h"
#include "parallm/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean([&] {
    const auto j =
        parallm::parse_json_text(parallm::fuzz::as_text(data, size), "config", "fuzz/config.json");
    const parallm::ModelConfig c = parallm::ModelConfig::from_json(j, "fuzz/config.json");
    (void)c.to_json().dump();
  });
  return 0;
}
