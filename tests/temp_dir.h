// TempDir: a fresh directory for a test, removed at scope exit. Apart from test_util.h so that
// helper programs built without the test definitions (parallm_fake_server) use it too.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace parallm::testing {

// A fresh directory under the system temp dir, removed with its contents at scope exit. mkdtemp
// makes it: a name built from the pid can meet a directory that an earlier process with the same
// pid left behind (killed, or a sanitizer abort) and read its stale files.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "parallm-test") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (!mkdtemp(tmpl.data())) std::abort();
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::string operator/(const std::string& name) const { return file(name); }
  // Writes content to the file `name` in the directory and returns its path.
  std::string write(const std::string& name, const std::string& content) const {
    std::ofstream(file(name), std::ios::binary) << content;
    return file(name);
  }

 private:
  std::string path_;
};

}  // namespace parallm::testing
