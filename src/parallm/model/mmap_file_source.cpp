#include "parallm/model/mmap_file_source.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "parallm/core/error.h"

namespace parallm {
namespace {

// convert() loads elements through typed pointers, so its source must be aligned for the source
// dtype. Safetensors does not promise aligned offsets; unaligned runs go through a small aligned
// bounce buffer instead.
void convert_any_alignment(const uint8_t* src, DType st, uint8_t* dst, DType dt, size_t n) {
  const size_t ss = dtype_size(st);
  // Block dtypes: their f16 scales sit at even offsets of every block, and the GGUF reader only
  // accepts tensors at aligned offsets.
  if (st == dt || is_block(st) || reinterpret_cast<uintptr_t>(src) % ss == 0) {
    convert(src, st, dst, dt, n);
    return;
  }
  alignas(64) uint8_t bounce[4096];
  // 4096 / 4 or 4096 / 2 values: whole blocks when dt is a block dtype (quantized on load).
  const size_t chunk = sizeof(bounce) / ss;
  for (size_t i = 0; i < n; i += chunk) {
    const size_t m = std::min(chunk, n - i);
    std::memcpy(bounce, src + i * ss, m * ss);
    convert(bounce, st, dst + dtype_bytes(dt, static_cast<int64_t>(i)), dt, m);
  }
}

}  // namespace

MappedTensorSource::MappedTensorSource(std::string component, std::string description,
                                       std::vector<std::shared_ptr<const MappedFile>> files,
                                       std::vector<MappedTensor> tensors)
    : component_(std::move(component)),
      description_(std::move(description)),
      files_(std::move(files)),
      tensors_(std::move(tensors)) {
  index_.reserve(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const MappedTensor& t = tensors_[i];
    if (t.file >= files_.size() || !files_[t.file])
      fail(component_, description_, ": tensor \"", t.name, "\" names file #", t.file, " of ",
           files_.size());
    const MappedFile& f = *files_[t.file];
    if (t.begin > t.end || t.end > f.size())
      fail(component_, f.path(), ": tensor \"", t.name, "\" spans bytes [", t.begin, ", ", t.end,
           ") but the file has ", f.size());
    if (!index_.emplace(t.name, i).second)
      fail(component_, description_, ": tensor \"", t.name, "\" appears twice");
  }
}

const MappedTensor& MappedTensorSource::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end())
    fail(component_, description_, ": no tensor named \"", name, "\" (the checkpoint has ",
         tensors_.size(), " tensors)");
  return tensors_[it->second];
}

bool MappedTensorSource::has(const std::string& name) const {
  return index_.count(name) != 0;
}

TensorInfo MappedTensorSource::info(const std::string& name) const {
  const MappedTensor& t = entry(name);
  if (!t.dtype)
    fail(component_, files_[t.file]->path(), ": tensor \"", name, "\" has dtype ", t.dtype_name,
         ", which parallm cannot read (supported: F32, BF16, F16)");
  return TensorInfo{t.name, *t.dtype, t.shape};
}

std::vector<std::string> MappedTensorSource::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const MappedTensor& t : tensors_) out.push_back(t.name);
  return out;
}

Tensor MappedTensorSource::read(const std::string& name, DType dtype, Slice slice) const {
  const TensorInfo ti = info(name);
  const MappedTensor& t = entry(name);
  const MappedFile& f = *files_[t.file];
  const Shape& shape = t.shape;
  // Byte counts through dtype_bytes: block dtypes (core/quant.h) hold whole blocks per row.
  const auto bytes_of = [&](int64_t n) { return dtype_bytes(ti.dtype, n); };
  const std::string what = cat("tensor \"", name, "\" ", shape_str(shape));

  // The slice as `runs` runs of `run` elements, the first at byte `first`, `stride` bytes apart.
  Shape out_shape = shape;
  size_t first = t.begin;
  size_t runs = 1;
  size_t run = static_cast<size_t>(shape_numel(shape));
  size_t stride = 0;
  switch (slice.kind) {
    case Slice::Kind::All:
      break;
    case Slice::Kind::Rows: {
      if (shape.empty()) fail(component_, f.path(), ": ", what, " is a scalar: it has no rows");
      if (slice.begin < 0 || slice.begin > slice.end || slice.end > shape[0])
        fail(component_, f.path(), ": ", what, ": row slice [", slice.begin, ", ", slice.end,
             ") is not within [0, ", shape[0], "]");
      int64_t inner = 1;
      for (size_t d = 1; d < shape.size(); ++d) inner *= shape[d];
      out_shape[0] = slice.end - slice.begin;
      first += bytes_of(slice.begin * inner);
      run = static_cast<size_t>(out_shape[0] * inner);
      break;
    }
    case Slice::Kind::Cols: {
      if (shape.size() != 2)
        fail(component_, f.path(), ": ", what, ": a column slice needs a 2-D tensor");
      if (slice.begin < 0 || slice.begin > slice.end || slice.end > shape[1])
        fail(component_, f.path(), ": ", what, ": column slice [", slice.begin, ", ", slice.end,
             ") is not within [0, ", shape[1], "]");
      const int64_t block = std::max(dtype_block(ti.dtype), dtype_block(dtype));
      if (slice.begin % block != 0 || slice.end % block != 0)
        fail(component_, f.path(), ": ", what, ": column slice [", slice.begin, ", ", slice.end,
             ") does not start and end on ", block, "-value block boundaries of ",
             dtype_name(block == dtype_block(ti.dtype) ? ti.dtype : dtype));
      out_shape[1] = slice.end - slice.begin;
      first += bytes_of(slice.begin);
      runs = static_cast<size_t>(shape[0]);
      run = static_cast<size_t>(out_shape[1]);
      stride = bytes_of(shape[1]);
      break;
    }
  }

  Tensor out = Tensor::empty(dtype, out_shape);
  const size_t total = runs * run;
  if (total == 0) return out;
  uint8_t* dst = out.data<uint8_t>();
  for (size_t r = 0; r < runs; ++r)
    convert_any_alignment(f.data() + first + r * stride, ti.dtype,
                          dst + dtype_bytes(dtype, static_cast<int64_t>(r * run)), dtype, run);
  bytes_read_.fetch_add(bytes_of(static_cast<int64_t>(total)), std::memory_order_relaxed);
  // The bytes now live in `out`; the mapped pages we touched can leave the resident set. For a
  // column slice that is every row's page (rows shorter than a page are read whole by the kernel).
  f.release(first, (runs - 1) * stride + bytes_of(static_cast<int64_t>(run)));
  return out;
}

}  // namespace parallm
