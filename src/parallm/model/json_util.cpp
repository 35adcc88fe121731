#include "parallm/model/json_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "parallm/core/error.h"

namespace parallm {

int json_nesting_depth(std::string_view text, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
      if (deepest > limit) return limit + 1;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

nlohmann::json parse_json_bounded(std::string_view text, std::string_view component,
                                  const std::string& source) {
  if (json_nesting_depth(text) > kMaxJsonDepth)
    fail(component, source, ": JSON nests deeper than ", kMaxJsonDepth, " levels");
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    fail(component, source, ": invalid JSON: ", e.what());
  }
}

std::string json_preview(const nlohmann::json& v, size_t max_chars) {
  if (v.is_array()) return cat("an array of ", v.size());
  if (v.is_object()) return cat("an object of ", v.size());
  std::string s = v.dump();
  if (s.size() > max_chars) s = s.substr(0, max_chars) + "...";
  return s;
}

std::string non_regular_kind(unsigned mode) {
  if (S_ISREG(mode)) return "";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

int open_regular_file(const std::string& path, std::string_view component, uint64_t* size,
                      bool missing_is_environment) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. The kind is
  // then checked on the descriptor itself, so nothing can swap the file between check and use.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT && !missing_is_environment) fail(component, path, ": no such file");
    if (err == ENOENT) fail<std::runtime_error>(component, path, ": no such file");
    fail<std::runtime_error>(component, path, ": cannot open: ", std::strerror(err));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail<std::runtime_error>(component, path, ": cannot stat: ", std::strerror(err));
  }
  const std::string kind = non_regular_kind(st.st_mode);
  if (!kind.empty()) {
    ::close(fd);
    fail(component, path, ": is ", kind, ", not a regular file");
  }
  // Regular files ignore O_NONBLOCK for reads, but clear it anyway for plain blocking reads.
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) (void)::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  *size = static_cast<uint64_t>(st.st_size);
  return fd;
}

std::string read_regular_file(const std::string& path, std::string_view component,
                              uint64_t max_bytes) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, component, &size, /*missing_is_environment=*/true);
  if (size > max_bytes) {
    ::close(fd);
    fail(component, path, ": ", size, " bytes is over the ", max_bytes, "-byte limit");
  }
  std::string text(static_cast<size_t>(size), '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t r = ::read(fd, text.data() + got, text.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;  // the file shrank while read: keep what is there
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  text.resize(got);
  return text;
}

}  // namespace parallm
