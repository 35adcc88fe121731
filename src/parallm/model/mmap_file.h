// MappedFile: a read-only memory mapping of a whole file, owned (unmapped on destruction).
// Weight readers copy slices out of it and then tell the kernel the pages they touched may be
// dropped, so a rank that reads 1/N of a model keeps about 1/N of it resident.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace parallm {

class MappedFile {
 public:
  MappedFile() = default;
  // Maps `path` read-only. Throws std::invalid_argument when the file does not exist or is a
  // directory, std::runtime_error when the OS refuses (naming the path and errno's text).
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;

  const std::string& path() const { return path_; }
  // Null for an empty file (a zero-length mapping is not allowed).
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

  // Tells the kernel that bytes [offset, offset + length) are not needed any more: the pages
  // that lie inside the range widened to page boundaries leave this process's resident set
  // (MADV_DONTNEED; the mapping is read-only and private, so the next touch re-reads them from the
  // page cache and the data is never lost). Safe while other threads read the same pages.
  void release(size_t offset, size_t length) const;
  // Hints that bytes [offset, offset + length) will be read soon (MADV_WILLNEED).
  void prefetch(size_t offset, size_t length) const;

 private:
  void unmap() noexcept;

  std::string path_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace parallm
