// MappedTensorSource: a WeightSource over tensors that lie at known byte ranges of memory-mapped
// files. The format readers (safetensors, llama2.c) only parse and validate their headers into a
// table of MappedTensor; reading, slicing, conversion and residency are handled here, once.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "parallm/model/mmap_file.h"
#include "parallm/model/weights.h"

namespace parallm {

// Where one tensor lies. Offsets are absolute bytes in files[file]; end - begin == numel x size.
struct MappedTensor {
  std::string name;
  size_t file = 0;
  std::string dtype_name;      // as the file spells it ("BF16", "I64", ...), for errors
  std::optional<DType> dtype;  // empty when the file's dtype is one we cannot read
  Shape shape;
  size_t begin = 0;
  size_t end = 0;
};

class MappedTensorSource final : public WeightSource {
 public:
  // `component` prefixes errors ("safetensors", "llama2c"); `description` names the source (the
  // path the user gave). Names must be unique and every range must lie inside its file (the
  // readers validate that; it is checked again here, cheaply, as a last line of defence).
  MappedTensorSource(std::string component, std::string description,
                     std::vector<std::shared_ptr<const MappedFile>> files,
                     std::vector<MappedTensor> tensors);

  bool has(const std::string& name) const override;
  TensorInfo info(const std::string& name) const override;
  std::vector<std::string> names() const override;  // in the order the reader listed them
  Tensor read(const std::string& name, DType dtype, Slice slice = Slice::all()) const override;
  uint64_t bytes_read() const override { return bytes_read_.load(std::memory_order_relaxed); }
  std::string describe() const override { return description_; }

  // The raw table entry (file, offsets, the file's dtype name), for tools and tests.
  const MappedTensor& entry(const std::string& name) const;
  const MappedFile& file(size_t i) const { return *files_.at(i); }
  size_t num_files() const { return files_.size(); }

 private:
  std::string component_;
  std::string description_;
  std::vector<std::shared_ptr<const MappedFile>> files_;
  std::vector<MappedTensor> tensors_;
  std::unordered_map<std::string, size_t> index_;
  mutable std::atomic<uint64_t> bytes_read_{0};
};

}  // namespace parallm
