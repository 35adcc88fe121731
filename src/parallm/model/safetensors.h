// Hugging Face safetensors: an 8-byte little-endian header length N, N bytes of JSON
// ({"name": {"dtype": "BF16", "shape": [r, c], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"key": "value"}}), then the data section; offsets are relative to it.
// open_safetensors() and write_safetensors() are declared in weights.h; this header exposes the
// pieces below them for tools and tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "parallm/model/mmap_file_source.h"

namespace parallm {

struct SafetensorsHeader {
  size_t data_start = 0;              // 8 + N: where the data section begins in the file
  std::vector<MappedTensor> tensors;  // file index 0, absolute offsets, in header order
  std::map<std::string, std::string> metadata;
};

// Parses and validates the header of a whole safetensors file held in `bytes` (`size` bytes):
// header length within the file, a JSON object, every entry's dtype (a safetensors dtype; ones
// parallm cannot read are kept with dtype empty and fail on info()/read()), shape (non-negative
// integers), data_offsets (begin <= end <= data section, end - begin == numel x dtype size), no two
// tensors overlapping, __metadata__ string values. Throws std::invalid_argument naming `source`,
// the tensor and the numbers.
SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size,
                                           const std::string& source);

// The weight_map of a model.safetensors.index.json held in `text`: (tensor name, shard file
// name) pairs in the index's order. Throws std::invalid_argument naming `source` when it is not
// JSON, has no "weight_map" object, or a value is not a string. open_safetensors() reads the file
// and calls this; the fuzzer (fuzz/safetensors_index.cpp) calls it on bytes in memory.
std::vector<std::pair<std::string, std::string>> parse_safetensors_index(std::string_view text,
                                                                      const std::string& source);

// True when the file starts like a safetensors file (a plausible header length, then '{').
bool looks_like_safetensors(const std::string& path);

// The __metadata__ of one safetensors file (empty when it has none).
std::map<std::string, std::string> read_safetensors_metadata(const std::string& path);

// Safetensors' name for a dtype ("F32", "BF16", "F16").
const char* safetensors_dtype_name(DType dtype);

inline constexpr const char* kSafetensorsFile = "model.safetensors";
inline constexpr const char* kSafetensorsIndexFile = "model.safetensors.index.json";

}  // namespace parallm
