#include "parallm/server/bench_client.h"

#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "parallm/core/error.h"

namespace parallm::server {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

std::unique_ptr<httplib::Client> make_client(const BenchOptions& o) {
  auto c = std::make_unique<httplib::Client>(o.base_url);
  if (!c->is_valid()) fail("bench serve", "--base-url ", o.base_url, ": not a valid http URL");
  const time_t t = static_cast<time_t>(o.timeout_s);
  c->set_read_timeout(t, 0);
  c->set_write_timeout(t, 0);
  c->set_connection_timeout(10, 0);
  if (!o.api_key.empty()) c->set_bearer_token_auth(o.api_key);
  return c;
}

// One streamed completion, timed at each SSE event that carries text.
RequestResult send_one(const BenchOptions& o, const std::string& model,
                       const std::vector<int32_t>& prompt, int output_len) {
  RequestResult r;
  r.prompt_len = static_cast<int64_t>(prompt.size());
  json body = {{"model", model},
               {"prompt", prompt},
               {"max_tokens", output_len},
               {"temperature", 0},
               {"stream", true},
               {"ignore_eos", o.ignore_eos},
               {"stream_options", {{"include_usage", true}}}};
  auto cli = make_client(o);
  httplib::Request req;
  req.method = "POST";
  req.path = o.endpoint;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  if (!o.api_key.empty()) req.set_header("Authorization", "Bearer " + o.api_key);
  std::string buf;
  bool first = true, done = false;
  Clock::time_point last;
  const Clock::time_point t0 = Clock::now();
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    buf.append(data, n);
    size_t end;
    while ((end = buf.find("\n\n")) != std::string::npos) {
      std::string ev = buf.substr(0, end);
      buf.erase(0, end + 2);
      if (ev.rfind("data: ", 0) != 0) continue;
      ev.erase(0, 6);
      if (ev == "[DONE]") {
        done = true;
        continue;
      }
      json j = json::parse(ev, nullptr, false);
      if (j.is_discarded()) {
        r.error = "an event is not JSON: " + ev.substr(0, 200);
        return false;
      }
      if (j.contains("error")) {
        r.error = j["error"].value("message", "error event");
        continue;
      }
      if (j.contains("usage") && j["usage"].is_object())
        r.output_tokens = j["usage"].value("completion_tokens", int64_t{0});
      if (!j.contains("choices") || j["choices"].empty()) continue;
      const json& ch = j["choices"][0];
      std::string text;
      if (ch.contains("text") && ch["text"].is_string()) text = ch["text"];
      if (ch.contains("delta") && ch["delta"].contains("content") &&
          ch["delta"]["content"].is_string())
        text = ch["delta"]["content"];
      if (text.empty()) continue;
      const auto now = Clock::now();
      if (first) {
        r.ttft = std::chrono::duration<double>(now - t0).count();
        first = false;
      } else {
        r.itl.push_back(std::chrono::duration<double>(now - last).count());
      }
      last = now;
      r.text += text;
    }
    return true;
  };
  auto res = cli->send(req);
  r.latency = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!res) {
    if (r.error.empty()) r.error = "HTTP request failed: " + httplib::to_string(res.error());
  } else if (res->status != 200) {
    json j = json::parse(res->body, nullptr, false);
    r.error = "HTTP " + std::to_string(res->status) + ": " +
              (j.is_object() && j.contains("error") ? j["error"].value("message", res->body)
                                                    : res->body.substr(0, 200));
  } else if (r.error.empty() && !done) {
    r.error = "the stream ended without [DONE]";
  }
  r.ok = r.error.empty();
  return r;
}

struct Stats {
  double mean = 0, median = 0, std = 0, p50 = 0, p90 = 0, p99 = 0;
};

// numpy's percentile (linear interpolation between closest ranks).
double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

Stats stats_ms(const std::vector<double>& seconds) {
  Stats s;
  if (seconds.empty()) return s;
  std::vector<double> v;
  for (double x : seconds) v.push_back(x * 1000.0);
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  double var = 0;
  for (double x : v) var += (x - s.mean) * (x - s.mean);
  s.std = std::sqrt(var / static_cast<double>(v.size()));
  s.median = s.p50 = percentile(v, 50);
  s.p90 = percentile(v, 90);
  s.p99 = percentile(v, 99);
  return s;
}

}  // namespace

BenchReport run_bench_serve(const BenchOptions& o) {
  if (o.num_prompts < 1) fail("bench serve", "--num-prompts must be >= 1, got ", o.num_prompts);
  if (!(o.request_rate > 0))
    fail("bench serve", "--request-rate must be > 0 (or inf), got ", o.request_rate);
  if (o.input_len < 1 || o.output_len < 1)
    fail("bench serve", "--random-input-len and --random-output-len must be >= 1");
  if (o.range_ratio < 0 || o.range_ratio >= 1)
    fail("bench serve", "--random-range-ratio must be in [0, 1), got ", o.range_ratio);
  BenchReport rep;
  rep.options = o;
  // The model and its vocabulary from /v1/models.
  {
    auto cli = make_client(o);
    auto res = cli->Get("/v1/models");
    if (!res)
      fail<std::runtime_error>("bench serve", o.base_url, ": cannot reach the server (",
                               httplib::to_string(res.error()), ")");
    if (res->status != 200)
      fail<std::runtime_error>("bench serve", o.base_url, "/v1/models: HTTP ", res->status, ": ",
                               res->body.substr(0, 200));
    json j = json::parse(res->body, nullptr, false);
    rep.model = o.model;
    int64_t vocab = o.vocab_size;
    if (j.is_object() && j.contains("data") && j["data"].is_array() && !j["data"].empty()) {
      if (rep.model.empty()) rep.model = j["data"][0].value("id", "");
      if (vocab == 0) vocab = j["data"][0].value("vocab_size", int64_t{0});
    }
    if (vocab == 0) vocab = 32000;
    rep.options.vocab_size = static_cast<int32_t>(vocab);
  }
  // Requests: lengths and ids from the seed; arrival gaps exponential (Poisson process).
  std::mt19937_64 rng(o.seed);
  auto length = [&](int len) {
    const int lo = std::max(1, static_cast<int>(std::lround(len * (1 - o.range_ratio))));
    const int hi = std::max(lo, static_cast<int>(std::lround(len * (1 + o.range_ratio))));
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  const int32_t vocab = rep.options.vocab_size;
  const int32_t id_lo = vocab > 1000 ? 100 : 0;  // keep clear of the specials at the front
  std::uniform_int_distribution<int32_t> id_dist(id_lo, vocab - 1);
  std::exponential_distribution<double> gap(std::isinf(o.request_rate) ? 1.0 : o.request_rate);
  std::vector<std::vector<int32_t>> prompts(o.num_prompts);
  std::vector<int> out_lens(o.num_prompts);
  std::vector<double> arrivals(o.num_prompts);
  double t = 0;
  for (int i = 0; i < o.num_prompts; ++i) {
    prompts[i].resize(length(o.input_len));
    for (auto& id : prompts[i]) id = id_dist(rng);
    out_lens[i] = length(o.output_len);
    arrivals[i] = t;
    if (!std::isinf(o.request_rate)) t += gap(rng);
  }

  rep.requests.resize(o.num_prompts);
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  for (int i = 0; i < o.num_prompts; ++i) {
    std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(arrivals[i])));
    threads.emplace_back([&, i] {
      if (o.max_concurrency > 0) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return active < o.max_concurrency; });
        ++active;
      }
      rep.requests[i] = send_one(o, rep.model, prompts[i], out_lens[i]);
      if (o.max_concurrency > 0) {
        std::lock_guard<std::mutex> lock(mu);
        --active;
        cv.notify_one();
      }
    });
  }
  for (auto& th : threads) th.join();
  rep.duration = std::chrono::duration<double>(Clock::now() - start).count();
  return rep;
}

json BenchReport::to_json() const {
  json j;
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y%m%d-%H%M%S", std::gmtime(&now));
  j["date"] = date;
  j["backend"] = "openai";
  j["model_id"] = model;
  j["base_url"] = options.base_url;
  j["endpoint"] = options.endpoint;
  j["num_prompts"] = options.num_prompts;
  j["request_rate"] = std::isinf(options.request_rate) ? json("inf") : json(options.request_rate);
  j["burstiness"] = 1.0;
  j["max_concurrency"] =
      options.max_concurrency > 0 ? json(options.max_concurrency) : json(nullptr);
  j["seed"] = options.seed;
  j["random_input_len"] = options.input_len;
  j["random_output_len"] = options.output_len;
  j["random_range_ratio"] = options.range_ratio;
  int64_t completed = 0, in_tok = 0, out_tok = 0;
  std::vector<double> ttfts, tpots, itls, e2els;
  json input_lens = json::array(), output_lens = json::array(), ttft_list = json::array(),
       itl_list = json::array(), errors = json::array(), texts = json::array();
  for (const RequestResult& r : requests) {
    input_lens.push_back(r.prompt_len);
    output_lens.push_back(r.ok ? r.output_tokens : 0);
    ttft_list.push_back(r.ok ? r.ttft : 0.0);
    itl_list.push_back(r.ok ? json(r.itl) : json::array());
    errors.push_back(r.error);
    texts.push_back(r.text);
    if (!r.ok) continue;
    ++completed;
    in_tok += r.prompt_len;
    out_tok += r.output_tokens;
    ttfts.push_back(r.ttft);
    e2els.push_back(r.latency);
    if (r.output_tokens > 1)
      tpots.push_back((r.latency - r.ttft) / static_cast<double>(r.output_tokens - 1));
    itls.insert(itls.end(), r.itl.begin(), r.itl.end());
  }
  j["duration"] = duration;
  j["completed"] = completed;
  j["failed"] = static_cast<int64_t>(requests.size()) - completed;
  j["total_input_tokens"] = in_tok;
  j["total_output_tokens"] = out_tok;
  j["request_throughput"] = duration > 0 ? completed / duration : 0.0;
  j["output_throughput"] = duration > 0 ? out_tok / duration : 0.0;
  j["total_token_throughput"] = duration > 0 ? (in_tok + out_tok) / duration : 0.0;
  auto put = [&](const char* name, const std::vector<double>& v) {
    const Stats s = stats_ms(v);
    const std::string n = name;
    j["mean_" + n + "_ms"] = s.mean;
    j["median_" + n + "_ms"] = s.median;
    j["std_" + n + "_ms"] = s.std;
    j["p50_" + n + "_ms"] = s.p50;
    j["p90_" + n + "_ms"] = s.p90;
    j["p99_" + n + "_ms"] = s.p99;
  };
  put("ttft", ttfts);
  put("tpot", tpots);
  put("itl", itls);
  put("e2el", e2els);
  j["input_lens"] = input_lens;
  j["output_lens"] = output_lens;
  j["ttfts"] = ttft_list;
  j["itls"] = itl_list;
  j["generated_texts"] = texts;
  j["errors"] = errors;
  return j;
}

std::string BenchReport::summary() const {
  const json j = to_json();
  std::ostringstream o;
  char line[160];
  auto row = [&](const char* label, const json& v, int prec) {
    if (v.is_number_float())
      std::snprintf(line, sizeof(line), "%-40s %.*f\n", label, prec, v.get<double>());
    else
      std::snprintf(line, sizeof(line), "%-40s %s\n", label, v.dump().c_str());
    o << line;
  };
  auto head = [&](const char* title) {
    std::snprintf(line, sizeof(line), "%s\n", title);
    o << line;
  };
  head("============ Serving Benchmark Result ============");
  row("Successful requests:", j["completed"], 0);
  row("Failed requests:", j["failed"], 0);
  row("Benchmark duration (s):", j["duration"], 2);
  row("Total input tokens:", j["total_input_tokens"], 0);
  row("Total generated tokens:", j["total_output_tokens"], 0);
  row("Request throughput (req/s):", j["request_throughput"], 2);
  row("Output token throughput (tok/s):", j["output_throughput"], 2);
  row("Total Token throughput (tok/s):", j["total_token_throughput"], 2);
  const std::pair<const char*, const char*> groups[] = {
      {"ttft", "---------------Time to First Token----------------"},
      {"tpot", "-----Time per Output Token (excl. 1st token)------"},
      {"itl", "---------------Inter-token Latency----------------"},
      {"e2el", "----------------End-to-end Latency----------------"}};
  for (const auto& [key, title] : groups) {
    head(title);
    const std::string k = key;
    std::string upper = k;
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    for (const char* stat : {"mean", "median", "p99"}) {
      const std::string label = std::string(stat == std::string("mean")     ? "Mean"
                                            : stat == std::string("median") ? "Median"
                                                                            : "P99") +
                                " " + upper + " (ms):";
      row(label.c_str(), j[std::string(stat) + "_" + k + "_ms"], 2);
    }
  }
  head("==================================================");
  for (const RequestResult& r : requests) {
    if (!r.ok) {
      o << "first error: " << r.error << "\n";
      break;
    }
  }
  return o.str();
}

}  // namespace parallm::server
