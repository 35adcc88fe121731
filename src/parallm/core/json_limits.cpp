#include "parallm/core/json_limits.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "parallm/core/error.h"

namespace parallm {

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

std::string read_text_file(const std::string& path, size_t max_bytes, std::string_view component) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, component, &size, /*missing_is_environment=*/true);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  if (size > max_bytes)
    fail(component, path, ": ", size, " bytes, larger than the ", max_bytes,
         " bytes allowed for this input");
  // Read to EOF but never past the limit: the file may grow while we read it.
  std::string text;
  text.reserve(size_t(size));
  char buf[65536];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail<std::runtime_error>(component, path, ": read failed (", std::strerror(errno), ")");
    }
    if (n == 0) break;
    if (text.size() + size_t(n) > max_bytes)
      fail(component, path, ": larger than the ", max_bytes, " bytes allowed for this input");
    text.append(buf, size_t(n));
  }
  return text;
}

void check_json_depth(std::string_view text, size_t max_depth, std::string_view component,
                      std::string_view source) {
  size_t depth = 0;
  bool in_string = false, escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
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
      if (++depth > max_depth)
        fail(component, source, ": JSON nested deeper than ", max_depth, " levels (at byte ", i,
             ")");
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;  // unbalanced brackets are the parser's to report
    }
  }
}

nlohmann::json parse_json_text(std::string_view text, std::string_view component,
                               std::string_view source, size_t max_depth) {
  check_json_depth(text, max_depth, component, source);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for 1e999
    fail(component, source, ": invalid JSON: ", e.what());
  }
}

nlohmann::json read_json_file(const std::string& path, std::string_view component,
                              size_t max_bytes, size_t max_depth) {
  return parse_json_text(read_text_file(path, max_bytes, component), component, path, max_depth);
}

std::string json_preview(const nlohmann::json& j, size_t max_chars) {
  if (j.is_array()) return cat("an array of ", j.size(), j.size() == 1 ? " element" : " elements");
  if (j.is_object()) return cat("an object of ", j.size(), j.size() == 1 ? " field" : " fields");
  if (j.is_binary()) return "binary data";
  if (j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    if (s.size() <= max_chars) return nlohmann::json(s).dump();
    // Cut on a character boundary of UTF-8 so that the message stays valid text.
    size_t cut = max_chars;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
    return nlohmann::json(s.substr(0, cut)).dump() + "... (" + std::to_string(s.size()) +
           " bytes)";
  }
  return j.dump();  // a number, boolean or null: short
}

std::string json_path(std::string_view prefix, std::string_view field) {
  if (prefix.empty()) return std::string(field);
  return cat(prefix, ".", field);
}

std::string json_path(std::string_view prefix, size_t index) {
  return cat(prefix, "[", index, "]");
}

}  // namespace parallm
