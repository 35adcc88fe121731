// Fuzzes parse_gguf (model/gguf.h): the input is a whole GGUF file (header, metadata, tensor
// infos, data). A file that parses then goes through gguf_llama_config and gguf_tokenizer (a
// tokenizer it yields encodes and decodes), and every tensor it lists is dequantized (its bytes are
// inside the input, which parse_gguf promised).
#include <vector>

#include "fuzz_main.h"
#include "parallm/core/dtype.h"
#include "parallm/model/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean([&] {
    const parallm::GgufHeader h = parallm::parse_gguf(data, size, "fuzz.gguf");
    parallm::fuzz::expect_clean([&] { (void)parallm::gguf_llama_config(h, "fuzz.gguf"); });
    parallm::fuzz::expect_clean([&] {
      if (auto tok = parallm::gguf_tokenizer(h, "fuzz.gguf"))
        parallm::fuzz::exercise_tokenizer(*tok);
    });
    for (const parallm::GgufTensorInfo& t : h.tensors) {
      const int64_t n = parallm::shape_numel(t.shape);
      if (n > (int64_t{1} << 20)) continue;
      // Through an aligned copy, as the mapped file is page-aligned and offsets block-aligned.
      std::vector<uint8_t> raw(data + t.offset, data + t.offset + t.nbytes);
      std::vector<float> out(static_cast<size_t>(n));
      parallm::convert(raw.data(), t.dtype, out.data(), parallm::DType::F32, out.size());
    }
  });
  return 0;
}
