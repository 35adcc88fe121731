#include "parallm/server/metrics.h"

#include <cmath>
#include <cstdio>
#include <sstream>

namespace parallm::server {
namespace {

std::string num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

std::string with_le(const std::string& labels, const std::string& le) {
  return "{" + labels + (labels.empty() ? "" : ",") + "le=\"" + le + "\"}";
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++n_;
}

uint64_t Histogram::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return n_;
}

std::string Histogram::render(const std::string& name, const std::string& help,
                              const std::string& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::ostringstream o;
  o << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    o << name << "_bucket" << with_le(labels, num(bounds_[i])) << " " << cum << "\n";
  }
  cum += counts_.back();
  o << name << "_bucket" << with_le(labels, "+Inf") << " " << cum << "\n";
  o << name << "_sum{" << labels << "} " << num(sum_) << "\n";
  o << name << "_count{" << labels << "} " << n_ << "\n";
  return o.str();
}

// vLLM's buckets.
ServerMetrics::ServerMetrics()
    : ttft({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
            1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0}),
      itl({0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
           20.0, 40.0, 80.0}),
      e2e({0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,   5.0,   10.0,   15.0,  20.0,
           30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0}) {}

void ServerMetrics::count_finished(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reason == "stop")
    ++stop_;
  else if (reason == "length")
    ++length_;
  else if (reason == "abort")
    ++abort_;
  else
    ++error_;
}

std::string ServerMetrics::render(const std::string& model_name,
                                  const serve::EngineStats& s) const {
  std::string model = model_name;  // label values escape \ and "
  std::string esc;
  for (char c : model) {
    if (c == '\\' || c == '"') esc += '\\';
    if (c == '\n') {
      esc += "\\n";
      continue;
    }
    esc += c;
  }
  const std::string labels = "model_name=\"" + esc + "\"";
  std::ostringstream o;
  auto metric = [&](const char* name, const char* type, const char* help, double v) {
    o << "# HELP parallm:" << name << " " << help << "\n# TYPE parallm:" << name << " " << type
      << "\nparallm:" << name << "{" << labels << "} " << num(v) << "\n";
  };
  metric("num_requests_running", "gauge", "Requests in the running batch.",
         static_cast<double>(s.running));
  metric("num_requests_waiting", "gauge", "Requests waiting to run (preempted ones included).",
         static_cast<double>(s.waiting));
  metric("kv_cache_usage_perc", "gauge", "KV cache usage, 1 means full.", s.kv_usage);
  metric("prompt_tokens_total", "counter", "Prompt tokens computed.",
         static_cast<double>(s.prompt_tokens_total));
  metric("generation_tokens_total", "counter", "Tokens generated.",
         static_cast<double>(s.generation_tokens_total));
  metric("num_preemptions_total", "counter", "Requests preempted (recomputed later).",
         static_cast<double>(s.preemptions_total));
  metric("prefix_cache_queries_total", "counter", "Prompt KV blocks looked up in the prefix cache.",
         static_cast<double>(s.prefix_cache_queries_total));
  metric("prefix_cache_hits_total", "counter", "Prompt KV blocks found in the prefix cache.",
         static_cast<double>(s.prefix_cache_hits_total));
  {
    std::lock_guard<std::mutex> lock(mu_);
    o << "# HELP parallm:request_success_total Requests finished, by finish reason.\n"
      << "# TYPE parallm:request_success_total counter\n";
    const std::pair<const char*, uint64_t> rows[] = {
        {"stop", stop_}, {"length", length_}, {"abort", abort_}, {"error", error_}};
    for (const auto& [r, n] : rows) {
      o << "parallm:request_success_total{" << labels << ",finished_reason=\"" << r << "\"} " << n
        << "\n";
    }
  }
  o << ttft.render("parallm:time_to_first_token_seconds", "Time to the first token.", labels);
  o << itl.render("parallm:inter_token_latency_seconds", "Time between successive tokens.", labels);
  o << e2e.render("parallm:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                  labels);
  return o.str();
}

}  // namespace parallm::server
