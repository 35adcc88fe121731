#include "parallm/core/tensor.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/checked.h"

namespace parallm {
namespace {

constexpr size_t kHugePageBytes = size_t{2} << 20;

std::vector<int64_t> contiguous_strides(const Shape& shape) {
  std::vector<int64_t> st(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

void check_shape(const Shape& shape) {
  for (int64_t d : shape)
    if (d < 0) fail("tensor", "negative dimension in shape ", shape_str(shape));
}

// numel x element size, checked: a shape whose byte count overflows is an error, not a wrapped
// (too small) allocation that later writes go past.
size_t checked_bytes(const Shape& shape, DType dtype) {
  const std::string what = "tensor of shape " + shape_str(shape);
  int64_t n = 1;
  for (int64_t d : shape) n = checked_mul<int64_t>(n, d, what);
  // A block dtype's rows are whole blocks (a 0-D tensor of one: never a block dtype).
  const int64_t block = dtype_block(dtype);
  if (block > 1 && (shape.empty() || shape.back() % block != 0))
    fail("tensor", dtype_name(dtype), " ", what, ": the last dimension is not a multiple of the ",
         block, "-value block");
  return static_cast<size_t>(
      checked_mul<int64_t>(n / block, static_cast<int64_t>(dtype_size(dtype)), what));
}

}  // namespace

std::string shape_str(const Shape& s) {
  return "[" + join(s, ", ") + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Tensor Tensor::empty(DType dtype, Shape shape) {
  check_shape(shape);
  Tensor t;
  t.dtype_ = dtype;
  const size_t bytes = checked_bytes(shape, dtype);
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  // Tensors of 2 MiB and more (the weights above all) go on 2 MiB-aligned memory that the kernel is
  // asked to back with transparent huge pages: a decode step streams every weight once, and with
  // 4 KiB pages that is one TLB miss and page walk per 4 KiB read (see docs/benchmarks.md). Only
  // Tensor storage gets this: buffers kept outside a Tensor (the KV cache, a std::vector<float> in
  // engine/kv_cache.cpp) get the allocator's ordinary pages.
  const size_t align = bytes >= kHugePageBytes ? kHugePageBytes : 64;
  size_t rounded = (bytes + align - 1) / align * align;
  if (rounded == 0) rounded = 64;
  void* p = std::aligned_alloc(align, rounded);
  if (!p)
    fail<std::runtime_error>("tensor", "out of memory allocating ", bytes, " bytes for ",
                             t.describe());
#ifdef MADV_HUGEPAGE
  if (align == kHugePageBytes) (void)::madvise(p, rounded, MADV_HUGEPAGE);
#endif
  t.storage_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros(DType dtype, Shape shape) {
  Tensor t = empty(dtype, std::move(shape));
  std::memset(t.data_, 0, t.nbytes());
  return t;
}

Tensor Tensor::borrow(void* data, DType dtype, Shape shape, std::shared_ptr<void> keepalive) {
  check_shape(shape);
  Tensor t;
  t.dtype_ = dtype;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  t.data_ = data;
  t.storage_ = std::move(keepalive);
  return t;
}

bool Tensor::is_contiguous() const {
  return strides_ == contiguous_strides(shape_);
}

Tensor Tensor::reshape(Shape shape) const {
  if (!is_contiguous()) fail("tensor", "reshape of a non-contiguous tensor ", describe());
  int64_t known = 1;
  int infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0) fail("tensor", "reshape ", shape_str(shape), ": more than one -1");
      infer = static_cast<int>(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0 && known > 0) shape[infer] = numel() / known;
  if (shape_numel(shape) != numel())
    fail("tensor", "cannot reshape ", describe(), " to ", shape_str(shape));
  Tensor t = *this;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  if (ndim() < 1 || begin < 0 || end < begin || end > shape_[0])
    fail("tensor", "rows [", begin, ", ", end, ") out of range for ", describe());
  Tensor t = *this;
  t.shape_[0] = end - begin;
  t.data_ = static_cast<char*>(data_) + dtype_bytes(dtype_, begin * strides_[0]);
  return t;
}

Tensor Tensor::slice_cols(int64_t begin, int64_t end) const {
  if (ndim() != 2 || begin < 0 || end < begin || end > shape_[1])
    fail("tensor", "columns [", begin, ", ", end, ") out of range for ", describe());
  const int64_t block = dtype_block(dtype_);
  if (begin % block != 0 || end % block != 0)
    fail("tensor", "columns [", begin, ", ", end, ") of ", describe(), " are not on ", block,
         "-value block boundaries");
  Tensor t = *this;
  t.shape_[1] = end - begin;
  t.data_ = static_cast<char*>(data_) + dtype_bytes(dtype_, begin * strides_[1]);
  return t;
}

Tensor Tensor::contiguous() const {
  return to(dtype_);
}

Tensor Tensor::to(DType dtype) const {
  Tensor out = empty(dtype, shape_);
  if (numel() == 0) return out;
  if (is_contiguous()) {
    convert(data_, dtype_, out.data_, dtype, static_cast<size_t>(numel()));
    return out;
  }
  // Strided: copy the innermost dimension run by run (it must be unit-stride, as our views are).
  const int64_t inner = shape_.back();
  const int64_t rows = numel() / inner;
  // Byte offsets through dtype_bytes: block dtypes keep whole blocks per row.
  std::vector<int64_t> idx(shape_.size(), 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t off = 0;
    for (size_t d = 0; d + 1 < shape_.size(); ++d) off += idx[d] * strides_[d];
    if (strides_.back() != 1)
      fail("tensor", "copy of a tensor with inner stride ", strides_.back());
    convert(static_cast<char*>(data_) + dtype_bytes(dtype_, off), dtype_,
            static_cast<char*>(out.data_) + dtype_bytes(dtype, r * inner), dtype,
            static_cast<size_t>(inner));
    for (size_t d = shape_.size() - 1; d-- > 0;) {
      if (++idx[d] < shape_[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

std::string Tensor::describe() const {
  return cat(dtype_name(dtype_), shape_str(shape_));
}

}  // namespace parallm
