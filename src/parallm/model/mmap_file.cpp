#include "parallm/model/mmap_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"

namespace parallm {
namespace {

// Closes a file descriptor on every path out of the constructor.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

size_t page_size() {
  static const size_t kPage = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return kPage;
}

}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  // Only regular files: a FIFO, device or directory is refused without blocking (core/json_limits.h).
  Fd f;
  uint64_t size = 0;
  f.fd = open_regular_file(path, "mmap", &size);
  size_ = static_cast<size_t>(size);
  if (size_ == 0) return;
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, f.fd, 0);
  if (p == MAP_FAILED)
    fail<std::runtime_error>("mmap", path, ": cannot map ", size_,
                             " bytes: ", std::strerror(errno));
  data_ = static_cast<uint8_t*>(p);
}

MappedFile::~MappedFile() {
  unmap();
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void MappedFile::unmap() noexcept {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

void MappedFile::release(size_t offset, size_t length) const {
  if (data_ == nullptr || length == 0 || offset >= size_) return;
  const size_t end = std::min(size_, offset + length);
  // Whole pages that hold the range; the mapping starts page-aligned.
  const size_t page = page_size();
  const size_t first = offset / page * page;
  const size_t last = (end + page - 1) / page * page;
  // Advice only: a failure changes residency, never the data, so it is ignored.
  (void)::madvise(data_ + first, last - first, MADV_DONTNEED);
}

void MappedFile::prefetch(size_t offset, size_t length) const {
  if (data_ == nullptr || length == 0 || offset >= size_) return;
  const size_t end = std::min(size_, offset + length);
  const size_t page = page_size();
  const size_t first = offset / page * page;
  (void)::madvise(data_ + first, end - first, MADV_WILLNEED);
}

}  // namespace parallm
