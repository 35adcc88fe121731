#include "parallm/core/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace parallm {
namespace {

LogLevel initial_level() {
  const char* e = std::getenv("PARALLM_LOG");
  if (!e) return LogLevel::Warn;
  if (!std::strcmp(e, "error")) return LogLevel::Error;
  if (!std::strcmp(e, "info")) return LogLevel::Info;
  if (!std::strcmp(e, "debug")) return LogLevel::Debug;
  return LogLevel::Warn;
}

std::atomic<int>& level_store() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

}  // namespace

LogLevel log_level() {
  return static_cast<LogLevel>(level_store().load(std::memory_order_relaxed));
}
void set_log_level(LogLevel level) {
  level_store().store(static_cast<int>(level));
}

void log_line(LogLevel level, const std::string& message) {
  static std::mutex mu;
  static const char* names[] = {"error", "warn", "info", "debug"};
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "parallm %s: %s\n", names[static_cast<int>(level)], message.c_str());
}

}  // namespace parallm
