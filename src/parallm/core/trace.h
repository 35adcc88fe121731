// Timeline tracing in Chrome's trace-event format (loadable in Perfetto and chrome://tracing).
// Each rank's thread records spans into its own buffer (no locks on the hot path); nothing is
// recorded unless tracing was switched on for that thread. Spans: layer compute, collectives,
// point-to-point transfers and the waits for them.
#pragma once

#include <string>
#include <vector>

namespace parallm {

struct TraceEvent {
  std::string name;
  const char* category;  // "compute", "comm", "p2p", "wait"
  double begin_us;
  double duration_us;
};

class TraceBuffer {
 public:
  // `thread`: the trace's tid under the rank's pid (0: the rank's own thread); a named one gets a
  // thread_name line (the DP communication thread: "dp comm").
  explicit TraceBuffer(int rank, int thread = 0, std::string thread_name = "")
      : rank_(rank), thread_(thread), thread_name_(std::move(thread_name)) {}
  void add(std::string name, const char* category, double begin_s, double end_s);
  int rank() const { return rank_; }
  const std::vector<TraceEvent>& events() const { return events_; }
  // This rank's events as JSON objects separated by commas (to splice into one file): "[" + this +
  // "]" is a valid JSON array, whatever the span names hold.
  std::string to_json_events() const;

 private:
  int rank_;
  int thread_;
  std::string thread_name_;
  std::vector<TraceEvent> events_;
};

// Sets (or clears, with nullptr) the buffer spans on this thread go to.
void set_thread_trace(TraceBuffer* buffer);
TraceBuffer* thread_trace();

// Records [construction, destruction) as a span when this thread is tracing.
class TraceSpan {
 public:
  TraceSpan(const char* name, const char* category);
  TraceSpan(std::string name, const char* category);
  ~TraceSpan();
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

 private:
  TraceBuffer* buffer_;
  std::string name_;
  const char* category_;
  double begin_;
};

// Writes a complete trace file from the ranks' event JSON fragments (index = rank; each from
// to_json_events, or empty).
void write_trace_file(const std::string& path, const std::vector<std::string>& rank_events);

}  // namespace parallm
