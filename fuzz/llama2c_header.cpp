// Fuzzes the llama2.c header and the tensor layout it implies (model/llama2c.h, llama2c_tensors).
// The input's first 28 bytes are the header. The file size handed to the parser is the input's
// size, or, when the byte after the header is odd, the size the header implies: a huge model
// cannot be a fuzz input, but its layout (offsets, counts near the overflow limits) can still be
// checked without the bytes, since only the header is read.
#include "fuzz_main.h"
#include "parallm/model/llama2c.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean([&] {
    uint64_t file_size = size;
    if (size > parallm::kLlama2cHeaderBytes && (data[parallm::kLlama2cHeaderBytes] & 1)) {
      parallm::Llama2cHeader h;
      int32_t raw[7];
      __builtin_memcpy(raw, data, sizeof(raw));
      h.dim = raw[0], h.hidden_dim = raw[1], h.n_layers = raw[2], h.n_heads = raw[3];
      h.n_kv_heads = raw[4], h.vocab_size = raw[5], h.seq_len = raw[6];
      // The size only means something for a header the config accepts.
      (void)parallm::llama2c_config(h, "fuzz.bin");
      file_size = parallm::llama2c_file_bytes(h);
    }
    parallm::ModelConfig config;
    (void)parallm::llama2c_tensors(data, file_size, "fuzz.bin", &config);
  });
  return 0;
}
