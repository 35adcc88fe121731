// Fuzzes parse_safetensors_index (model/safetensors.h): the input is a
// model.safetensors.index.json; the shards it names are not opened (that part is the safetensors
// header target's).
#include "fuzz_main.h"
#include "parallm/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean([&] {
    (void)parallm::parse_safetensors_index(parallm::fuzz::as_text(data, size),
                                           "fuzz/model.safetensors.index.json");
  });
  return 0;
}
