// Tensor: a dtype, a shape, strides (in elements) and a pointer into storage that is either owned
// (64-byte aligned heap memory, shared between views) or borrowed (a memory-mapped file, a caller's
// buffer kept alive by `keepalive`). Row-major; views share storage and never copy.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallm/core/dtype.h"

namespace parallm {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);  // "[2, 3]"
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;

  // New owned, 64-byte aligned, uninitialised / zero-filled storage.
  static Tensor empty(DType dtype, Shape shape);
  static Tensor zeros(DType dtype, Shape shape);
  // A contiguous view of memory owned elsewhere; `keepalive` (may be null) holds the owner.
  static Tensor borrow(void* data, DType dtype, Shape shape,
                       std::shared_ptr<void> keepalive = nullptr);

  bool defined() const { return data_ != nullptr || !shape_.empty(); }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(i < 0 ? i + ndim() : i); }
  int64_t numel() const { return shape_numel(shape_); }
  // Block dtypes (core/quant.h): whole blocks along the last dimension.
  size_t nbytes() const { return dtype_bytes(dtype_, numel()); }
  bool is_contiguous() const;

  void* raw() const { return data_; }
  template <class T>
  T* data() const {
    return static_cast<T*>(data_);
  }

  // Same storage, new shape (contiguous tensors only; one dimension may be -1).
  Tensor reshape(Shape shape) const;
  // Rows [begin, end) of dimension 0: a view, contiguous if this one is.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  // Columns [begin, end) of the last dimension of a 2-D tensor: a strided view.
  Tensor slice_cols(int64_t begin, int64_t end) const;
  // A contiguous copy (same dtype).
  Tensor contiguous() const;
  // A contiguous copy converted to `dtype` (same dtype: a copy).
  Tensor to(DType dtype) const;

  std::string describe() const;  // "bf16[2048, 5632]"

 private:
  void* data_ = nullptr;
  std::shared_ptr<void> storage_;
  DType dtype_ = DType::F32;
  Shape shape_;
  std::vector<int64_t> strides_;
};

}  // namespace parallm
