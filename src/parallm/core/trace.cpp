#include "parallm/core/trace.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "parallm/core/error.h"
#include "parallm/core/timer.h"

namespace parallm {
namespace {

thread_local TraceBuffer* t_trace = nullptr;

// Microseconds since the first use in this process: small numbers, and threads of one process
// share the origin. (MPI processes on one machine share steady_clock too.)
double us(double seconds) {
  return seconds * 1e6;
}

}  // namespace

void TraceBuffer::add(std::string name, const char* category, double begin_s, double end_s) {
  events_.push_back({std::move(name), category, us(begin_s), us(end_s - begin_s)});
}

std::string TraceBuffer::to_json_events() const {
  // Each object through nlohmann-json, so that names with quotes, backslashes or control
  // characters come out escaped (and bytes that are not UTF-8 as U+FFFD, not as an exception).
  auto dump = [](const nlohmann::json& j) {
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  };
  std::string out;
  auto add = [&](const nlohmann::json& j) {
    if (!out.empty()) out += ",\n";
    out += dump(j);
  };
  if (thread_ == 0)
    add({{"name", "process_name"},
         {"ph", "M"},
         {"pid", rank_},
         {"args", {{"name", "rank " + std::to_string(rank_)}}}});
  if (!thread_name_.empty())
    add({{"name", "thread_name"},
         {"ph", "M"},
         {"pid", rank_},
         {"tid", thread_},
         {"args", {{"name", thread_name_}}}});
  for (const TraceEvent& e : events_) {
    add({{"name", e.name},
         {"cat", e.category},
         {"ph", "X"},
         {"pid", rank_},
         {"tid", thread_},
         {"ts", e.begin_us},
         {"dur", e.duration_us}});
  }
  return out;
}

void set_thread_trace(TraceBuffer* buffer) {
  t_trace = buffer;
}
TraceBuffer* thread_trace() {
  return t_trace;
}

TraceSpan::TraceSpan(const char* name, const char* category)
    : buffer_(t_trace), category_(category), begin_(0) {
  if (buffer_) {
    name_ = name;
    begin_ = now_seconds();
  }
}

TraceSpan::TraceSpan(std::string name, const char* category)
    : buffer_(t_trace), category_(category), begin_(0) {
  if (buffer_) {
    name_ = std::move(name);
    begin_ = now_seconds();
  }
}

TraceSpan::~TraceSpan() {
  if (buffer_) buffer_->add(std::move(name_), category_, begin_, now_seconds());
}

void write_trace_file(const std::string& path, const std::vector<std::string>& rank_events) {
  std::ofstream out(path);
  if (!out) fail<std::runtime_error>("trace", path, ": cannot open for writing");
  out << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
  bool first = true;
  for (const std::string& ev : rank_events) {
    if (ev.empty()) continue;
    if (!first) out << ",\n";
    out << ev;
    first = false;
  }
  out << "\n]}\n";
  if (!out) fail<std::runtime_error>("trace", path, ": write failed");
}

}  // namespace parallm
