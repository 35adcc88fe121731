// The server's Prometheus metrics (GET /metrics), named like vLLM's with a "parallm:" prefix:
// gauges and counters from the engine's stats, histograms of latencies the server measures from
// the times its token events arrive.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "parallm/engine/serve_engine.h"

namespace parallm::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  // "# HELP/# TYPE" lines, then _bucket{le=...} (cumulative), _sum and _count.
  std::string render(const std::string& name, const std::string& help,
                     const std::string& labels) const;
  uint64_t count() const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; last: above every bound
  double sum_ = 0;
  uint64_t n_ = 0;
};

class ServerMetrics {
 public:
  ServerMetrics();
  Histogram ttft, itl, e2e;
  void count_finished(const std::string& finish_reason);  // stop, length, abort, error
  // The whole /metrics body for `model_name` with the engine's current `stats`.
  std::string render(const std::string& model_name, const serve::EngineStats& stats) const;

 private:
  mutable std::mutex mu_;
  uint64_t stop_ = 0, length_ = 0, abort_ = 0, error_ = 0;
};

}  // namespace parallm::server
