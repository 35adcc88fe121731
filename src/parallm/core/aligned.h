// std::vector storage aligned to a cache line, for buffers the SIMD kernels load from: a 64-byte
// load from a buffer that is only 16-byte aligned (what malloc gives) spans two cache lines.
// Measured on Zen 5 (docs/benchmarks.md, 2026-12-03): the bf16 GEMV at 4 tokens read its weights
// at 12-13 GB/s with the permuted activations 16 bytes off a line and at 27-29 GB/s aligned.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace parallm {

template <class T, std::size_t Align = 64>
struct AlignedAllocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, Align>;
  };
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, Align>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(Align)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(Align)); }
  template <class U>
  bool operator==(const AlignedAllocator<U, Align>&) const {
    return true;
  }
};

template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T, 64>>;

}  // namespace parallm
