// parallm bench serve: load against a running OpenAI-compatible server (parallm serve, or any
// other): random token-id prompts sent as streamed completions at a Poisson rate, timed per
// token; prints vLLM benchmark_serving's table and writes its JSON layout (--result-file).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "parallm/cli/command.h"
#include "parallm/core/error.h"
#include "parallm/server/bench_client.h"

namespace parallm::cli {
namespace {

struct BenchServeOptions {
  server::BenchOptions bench;
  std::string host = "127.0.0.1", base_url, request_rate = "inf", result_file;
  int port = 8000;
  bool allow_eos = false;
};

int run_bench_serve(BenchServeOptions o) {
  server::BenchOptions b = o.bench;
  b.base_url = o.base_url.empty() ? "http://" + o.host + ":" + std::to_string(o.port) : o.base_url;
  if (o.request_rate == "inf" || o.request_rate == "Inf") {
    b.request_rate = INFINITY;
  } else {
    char* end = nullptr;
    b.request_rate = std::strtod(o.request_rate.c_str(), &end);
    if (end == o.request_rate.c_str() || *end || !(b.request_rate > 0))
      fail("bench serve", "--request-rate ", o.request_rate, ": expected a positive number or inf");
  }
  b.ignore_eos = !o.allow_eos;
  if (b.api_key.empty()) {
    if (const char* k = std::getenv("OPENAI_API_KEY")) b.api_key = k;
  }
  const server::BenchReport rep = server::run_bench_serve(b);
  std::printf("%s", rep.summary().c_str());
  if (!o.result_file.empty()) {
    std::ofstream out(o.result_file);
    if (!out)
      fail<std::runtime_error>("bench serve", "--result-file ", o.result_file, ": cannot write");
    out << rep.to_json().dump(1) << "\n";
    std::printf("wrote %s\n", o.result_file.c_str());
  }
  const auto j = rep.to_json();
  return j["completed"].get<int64_t>() > 0 ? 0 : 1;
}

const bool registered = register_command(
    {"bench serve",
     "Requests at a Poisson rate against a running server: throughput, TTFT, TPOT, ITL",
     [](CLI::App& app) {
       auto o = std::make_shared<BenchServeOptions>();
       app.add_option("--base-url", o->base_url, "Server URL (default http://HOST:PORT)");
       app.add_option("--host", o->host, "Server host")->capture_default_str();
       app.add_option("--port", o->port, "Server port")->capture_default_str();
       app.add_option("--endpoint", o->bench.endpoint, "Completions path")->capture_default_str();
       app.add_option("--model", o->bench.model, "Model name (default: the server's first)");
       app.add_option("--api-key", o->bench.api_key, "Bearer key (default $OPENAI_API_KEY)");
       app.add_option("--num-prompts", o->bench.num_prompts, "Requests to send")
           ->capture_default_str();
       app.add_option("--request-rate", o->request_rate,
                      "Requests per second, Poisson arrivals; inf sends all at once")
           ->capture_default_str();
       app.add_option("--seed", o->bench.seed, "Seed for lengths, prompts and arrival times")
           ->capture_default_str();
       app.add_option("--max-concurrency", o->bench.max_concurrency,
                      "Requests in flight at most (0: no limit)")
           ->capture_default_str();
       app.add_option("--random-input-len", o->bench.input_len, "Prompt tokens per request")
           ->capture_default_str();
       app.add_option("--random-output-len", o->bench.output_len, "Tokens to generate per request")
           ->capture_default_str();
       app.add_option("--random-range-ratio", o->bench.range_ratio,
                      "Lengths uniform in [len*(1-r), len*(1+r)]")
           ->capture_default_str();
       app.add_option("--vocab-size", o->bench.vocab_size,
                      "Token ids drawn below this (default: the server's vocab_size)");
       app.add_flag("--allow-eos", o->allow_eos,
                    "Let requests end at EOS (default: ignore_eos, exact output lengths)");
       app.add_option("--result-file", o->result_file, "Write the result JSON here");
       return [o] { return run_bench_serve(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
