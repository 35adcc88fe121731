// The client side of `parallm bench serve`: streamed completions against a running
// OpenAI-compatible server (parallm serve, vLLM, ...), sent at a Poisson rate, timed per token,
// summed up in the layout of vLLM's benchmark_serving.py result JSON.
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace parallm::server {

struct BenchOptions {
  std::string base_url = "http://127.0.0.1:8000";
  std::string endpoint = "/v1/completions";
  std::string model;    // "" = the first model /v1/models lists
  std::string api_key;  // sent as a Bearer token when set
  int num_prompts = 100;
  double request_rate = std::numeric_limits<double>::infinity();  // requests/s; inf: all at once
  uint64_t seed = 0;
  int max_concurrency = 0;  // 0: no limit
  int input_len = 128, output_len = 64;
  double range_ratio = 0;  // lengths uniform in [len * (1 - r), len * (1 + r)]
  int32_t vocab_size = 0;  // 0: /v1/models' vocab_size (a parallm extension), else 32000
  bool ignore_eos = true;  // every request generates exactly its output length
  double timeout_s = 3600;
};

struct RequestResult {
  bool ok = false;
  std::string error;
  int64_t prompt_len = 0, output_tokens = 0;
  double ttft = 0, latency = 0;  // seconds from sending
  std::vector<double> itl;       // seconds between successive chunks after the first
  std::string text;
};

struct BenchReport {
  BenchOptions options;
  std::string model;
  double duration = 0;
  std::vector<RequestResult> requests;
  // The vLLM benchmark_serving.py layout: completed, failed, request_throughput,
  // output_throughput, mean/median/std/p50/p90/p99 of ttft_ms, tpot_ms, itl_ms, e2el_ms, and the
  // per-request lists (input_lens, output_lens, ttfts, itls, errors).
  nlohmann::json to_json() const;
  std::string summary() const;  // the table printed to stdout
};

// Runs the benchmark; throws std::runtime_error naming the URL when the server cannot be reached
// at all (failed requests are counted, not thrown).
BenchReport run_bench_serve(const BenchOptions& options);

}  // namespace parallm::server
