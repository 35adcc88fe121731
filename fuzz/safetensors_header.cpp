// Fuzzes parse_safetensors_header (model/safetensors.h): the input is a whole safetensors file,
// header length, JSON header and data section.
#include "fuzz_main.h"
#include "parallm/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean(
      [&] { (void)parallm::parse_safetensors_header(data, size, "fuzz.safetensors"); });
  return 0;
}
