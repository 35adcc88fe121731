// Weight readers. A WeightSource names tensors the Hugging Face way ("model.layers.3.mlp.up_proj
// .weight") whatever the file format, and reads a whole tensor or a slice of it (a row range or a
// column range of a 2-D tensor), converted to the dtype asked for. A rank reads only its slices, so
// tensor parallelism never loads the full model into one rank.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallm/core/tensor.h"
#include "parallm/model/config.h"

namespace parallm {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
};

// Which part of a tensor to read: all of it, rows [begin, end) of dimension 0, or columns
// [begin, end) of dimension 1 of a 2-D tensor.
struct Slice {
  enum class Kind { All, Rows, Cols };
  Kind kind = Kind::All;
  int64_t begin = 0;
  int64_t end = 0;
  static Slice all() { return {}; }
  static Slice rows(int64_t b, int64_t e) { return {Kind::Rows, b, e}; }
  static Slice cols(int64_t b, int64_t e) { return {Kind::Cols, b, e}; }
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool has(const std::string& name) const = 0;
  // Throws std::invalid_argument naming the file and the tensor when it is missing.
  virtual TensorInfo info(const std::string& name) const = 0;
  virtual std::vector<std::string> names() const = 0;
  // An owned, contiguous tensor of `dtype` holding the slice; reads only the bytes of the slice.
  virtual Tensor read(const std::string& name, DType dtype, Slice slice = Slice::all()) const = 0;
  // Bytes of tensor data read so far (for --mem-stats and tests of sharded loading).
  virtual uint64_t bytes_read() const = 0;
  virtual std::string describe() const = 0;  // the path, for error messages
};

// A Hugging Face model: `path` is a directory holding model.safetensors or
// model.safetensors.index.json (+ shards), or a single .safetensors file. Memory-maps each file and
// validates every header field (JSON, dtype names, shapes, offsets within the file, no overlaps).
std::unique_ptr<WeightSource> open_safetensors(const std::string& path);

// A llama2.c legacy checkpoint (see ../shared/models/stories260K/README.md): fills `config`
// (rope_interleaved = true, tie_word_embeddings from the sign of vocab_size) and exposes the
// arrays under Hugging Face names.
std::unique_ptr<WeightSource> open_llama2c(const std::string& path, ModelConfig* config);

// Opens a model directory or file, whichever format it is: a llama2.c .bin, or a Hugging Face
// directory/file (config from config.json beside it). Fills `config`.
std::unique_ptr<WeightSource> open_model(const std::string& path, ModelConfig* config);

// Writes tensors (any dtype, contiguous) to one .safetensors file, with optional string metadata.
// Writes to a temporary file and renames it, so a failure never leaves a half-written file.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Checks that `source` holds every tensor a LLaMA model of `config` needs (llama_tensors(config),
// model/llama_tensors.h), with the right shapes; throws std::invalid_argument naming the file, the tensor and both shapes otherwise.
void check_llama_weights(const WeightSource& source, const ModelConfig& config);

// Hugging Face tensor names of a LLaMA model.
namespace names {
std::string layer(int64_t i, const std::string& suffix);  // "model.layers.{i}.{suffix}"
inline const char* kEmbed = "model.embed_tokens.weight";
inline const char* kNorm = "model.norm.weight";
inline const char* kLmHead = "lm_head.weight";
}  // namespace names

}  // namespace parallm
