// `parallm serve` end to end, in process: the real serving engine (make_serve_engine on
// stories260K, TP/PP ranks as threads) behind the real HttpServer on an ephemeral loopback port,
// driven over raw HTTP. Every greedy completion must be exactly what run_generation (the
// `parallm generate` loop) gives the same prompt alone on one rank, whatever the load, the layout,
// the KV budget or the prefix cache; /metrics must show what the engine did.
//
// The model's ids are shown through the small test tokenizer of fake_engine.h (about 460 pieces,
// inside stories260K's 512): the text is not English, but it is a pure function of the ids, so
// equal text and equal token counts mean equal tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "engine/serve_test_util.h"
#include "parallm/model/tokenizer_unicode.h"
#include "server/server_test_util.h"
#include "test_util.h"

namespace parallm::testing {
namespace {

using namespace std::chrono_literals;
using serve::ServeConfig;
using serve::testing::mixed_prompts;
using serve::testing::reference;
using serve::testing::stories_config;
using serve::testing::Watchdog;
using Clock = std::chrono::steady_clock;

constexpr int kModelVocab = 512;  // stories260K's

// Writes the test tokenizer (and a chatml template) into `dir`, its vocabulary padded with
// placeholder pieces "<xN>" up to the model's 512 ids: every id the model can sample decodes.
void write_e2e_model_dir(const std::string& dir, bool pad = true) {
  write_test_model(dir, kChatmlTemplate);
  if (!pad) return;
  const std::string path = dir + "/tokenizer.json";
  json j = json::parse(std::ifstream(path));
  json& vocab = j["model"]["vocab"];
  const int used = static_cast<int>(vocab.size());  // ids 0..used-1, the specials included
  for (int id = used; id < kModelVocab; ++id) vocab["<x" + std::to_string(id) + ">"] = id;
  std::ofstream(path) << j.dump(1);
}

class E2EModelDir {
 public:
  explicit E2EModelDir(bool pad) : dir_("parallm_e2e") { write_e2e_model_dir(dir_.path(), pad); }
  std::string str() const { return dir_.path(); }

 private:
  TempDir dir_;
};

// The real engine and server over a temp directory holding the test tokenizer; the model is
// stories260K.
struct E2ERig {
  E2EModelDir dir;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<serve::ServeEngine> engine;
  std::unique_ptr<server::HttpServer> http;
  int port = 0;

  explicit E2ERig(const ServeConfig& config, bool pad = true) : dir(pad) {
    tok = load_tokenizer(dir.str());
    if (pad) {
      EXPECT_EQ(tok->vocab_size(), kModelVocab);
    }
    engine = serve::make_serve_engine(config);
    EXPECT_TRUE(serve::testing::wait_ready(*engine)) << engine->failure();
    server::ServerOptions opts;
    opts.model_dir = dir.str();
    http = std::make_unique<server::HttpServer>(*engine, *tok, opts);
    port = http->listen("127.0.0.1", 0);
  }
  ~E2ERig() {
    http->stop();
    engine->shutdown();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    return c;
  }
  json post(const json& body) const {
    auto r = client().Post("/v1/completions", body.dump(), "application/json");
    EXPECT_TRUE(r) << "no response";
    if (!r) return json();
    EXPECT_EQ(r->status, 200) << r->body;
    return body.value("stream", false) ? json(r->body) : json::parse(r->body);
  }
  // The value of `parallm:NAME{...}` in /metrics, on the line whose labels contain `label`
  // (-1 if there is none).
  double metric(const std::string& name, const std::string& label = "") const {
    auto r = client().Get("/metrics");
    if (!r || r->status != 200) return -1;
    std::istringstream in(r->body);
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("parallm:" + name + "{", 0) != 0) continue;
      const size_t close = line.find("} ");
      if (line.substr(0, close).find(label) == std::string::npos) continue;
      return std::stod(line.substr(close + 2));
    }
    return -1;
  }
  // What the server must show for `generated` after `prompt`: each token decoded after the one
  // before it (the prompt's last token first), as whole UTF-8 characters; ids the tokenizer lacks
  // show as nothing, and the token after one is decoded as a text's first (no leading space).
  std::string text_of(const std::vector<int32_t>& prompt,
                      const std::vector<int32_t>& generated) const {
    std::string s;
    int32_t prev = prompt.back();
    for (int32_t id : generated) {
      if (id < tok->vocab_size()) s += tok->decode_token(prev < tok->vocab_size() ? prev : -1, id);
      prev = id;
    }
    return unicode::sanitize_utf8(s);
  }
};

std::string streamed_text(const std::string& body) {
  std::string s;
  for (const json& c : parse_sse(body))
    for (const json& ch : c["choices"]) s += ch["text"].get<std::string>();
  return s;
}

json request(const std::vector<int32_t>& prompt, int64_t max_tokens, bool stream,
             bool ignore_eos = true) {
  return {{"prompt", prompt},
          {"max_tokens", max_tokens},
          {"temperature", 0},
          {"ignore_eos", ignore_eos},
          {"stream", stream}};
}

ServeConfig config(int tp, int pp) {
  ServeConfig c = stories_config(tp, pp);
  c.max_num_seqs = 32;
  c.max_num_batched_tokens = 64;
  return c;
}

TEST(ServeE2E, GreedyTextAndIdPromptsMatchGenerate) {
  Watchdog wd(60);
  E2ERig rig(config(1, 1));
  // Text prompts (the server adds BOS) and token-id prompts (used as given).
  std::vector<std::string> texts = {"Once upon a time", "Hello world", "The tiny robot said"};
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& t : texts) prompts.push_back(rig.tok->encode(t, true));
  for (const auto& p : mixed_prompts(3, 12, 7)) prompts.push_back(p);
  const std::vector<int64_t> max_tokens(prompts.size(), 12);
  const auto want = reference(prompts, max_tokens, true);
  for (size_t i = 0; i < prompts.size(); ++i) {
    SCOPED_TRACE("prompt " + std::to_string(i));
    json body = request(prompts[i], 12, false);
    if (i < texts.size()) body["prompt"] = texts[i];
    const json a = rig.post(body);
    const std::string expect = rig.text_of(prompts[i], want[i]);
    EXPECT_EQ(a["choices"][0]["text"], expect);
    EXPECT_EQ(a["usage"]["completion_tokens"], want[i].size());
    EXPECT_EQ(a["usage"]["prompt_tokens"], prompts[i].size());
    EXPECT_EQ(a["choices"][0]["finish_reason"], "length");
    body["stream"] = true;
    EXPECT_EQ(streamed_text(rig.post(body).get<std::string>()), expect);
  }
  // A chat: the chatml template's ids (as /tokenize renders them) continue greedily, streamed too.
  const json messages = {{{"role", "user"}, {"content", "Hello world"}}};
  auto t =
      rig.client().Post("/tokenize", json({{"messages", messages}}).dump(), "application/json");
  ASSERT_TRUE(t && t->status == 200);
  const auto chat_ids = json::parse(t->body)["tokens"].get<std::vector<int32_t>>();
  const auto chat_want = reference({chat_ids}, {10}, true);
  json chat = {
      {"messages", messages}, {"max_tokens", 10}, {"temperature", 0}, {"ignore_eos", true}};
  auto c = rig.client().Post("/v1/chat/completions", chat.dump(), "application/json");
  ASSERT_TRUE(c && c->status == 200) << (c ? c->body : "no response");
  const json cj = json::parse(c->body);
  EXPECT_EQ(cj["choices"][0]["message"]["content"], rig.text_of(chat_ids, chat_want[0]));
  EXPECT_EQ(cj["usage"]["prompt_tokens"], chat_ids.size());
  EXPECT_EQ(cj["usage"]["completion_tokens"], 10);
  chat["stream"] = true;
  c = rig.client().Post("/v1/chat/completions", chat.dump(), "application/json");
  ASSERT_TRUE(c && c->status == 200);
  std::string streamed;
  for (const json& ch : parse_sse(c->body))
    for (const json& x : ch["choices"])
      if (x["delta"].contains("content")) streamed += x["delta"]["content"].get<std::string>();
  EXPECT_EQ(streamed, cj["choices"][0]["message"]["content"]);

  // Without ignore_eos: EOS (or the length) ends it exactly where run_generation stops.
  const auto free_run = reference({prompts[0]}, {48}, false);
  const json b = rig.post(request(prompts[0], 48, false, false));
  EXPECT_EQ(b["choices"][0]["text"], rig.text_of(prompts[0], free_run[0]));
  EXPECT_EQ(b["usage"]["completion_tokens"], free_run[0].size());
  EXPECT_EQ(b["choices"][0]["finish_reason"], free_run[0].size() < 48 ? "stop" : "length");
}

// `n` concurrent streaming clients of mixed prompt and output lengths: every stream equals offline
// greedy, and /metrics shows more than one request running at some point meanwhile.
void concurrent_streams(const ServeConfig& c, int n) {
  E2ERig rig(c);
  const auto prompts = mixed_prompts(n, 20, 11 + c.tp * 10 + c.pp);
  std::vector<int64_t> max_tokens(n);
  for (int i = 0; i < n; ++i) max_tokens[i] = 4 + (i * 7) % 13;
  const auto want = reference(prompts, max_tokens, true);
  std::atomic<bool> done{false};
  std::atomic<double> max_running{0};
  std::thread poller([&] {
    while (!done) {
      const double r = rig.metric("num_requests_running");
      if (r > max_running) max_running = r;
      std::this_thread::sleep_for(2ms);
    }
  });
  std::vector<std::string> got(n);
  std::vector<std::thread> clients;
  for (int i = 0; i < n; ++i)
    clients.emplace_back(
        [&, i] { got[i] = rig.post(request(prompts[i], max_tokens[i], true)).get<std::string>(); });
  for (auto& t : clients) t.join();
  done = true;
  poller.join();
  for (int i = 0; i < n; ++i)
    EXPECT_EQ(streamed_text(got[i]), rig.text_of(prompts[i], want[i])) << "client " << i;
  EXPECT_GT(max_running.load(), 1) << "the batch never held two requests";
  EXPECT_EQ(rig.metric("num_requests_running"), 0);
  EXPECT_EQ(rig.metric("kv_cache_usage_perc"), 0);
}

TEST(ServeE2E, ConcurrentStreamsTp2) {
  Watchdog wd(60);
  concurrent_streams(config(2, 1), 48);
}
TEST(ServeE2E, ConcurrentStreamsPp2) {
  Watchdog wd(60);
  concurrent_streams(config(1, 2), 32);
}
TEST(ServeE2E, ConcurrentStreamsTp2Pp2) {
  Watchdog wd(60);
  concurrent_streams(config(2, 2), 32);
}

TEST(ServeE2E, ShortRequestStartsBeforeLongOneEnds) {
  Watchdog wd(60);
  E2ERig rig(config(1, 1));
  // Streams with the time each piece arrived.
  auto stream = [&](const json& body, Clock::time_point* first, Clock::time_point* last) {
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = body.dump();
    req.set_header("Content-Type", "application/json");
    bool seen = false;
    req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
      if (!seen && std::string(d, n).find("\"text\"") != std::string::npos) {
        *first = Clock::now();
        seen = true;
      }
      *last = Clock::now();
      return true;
    };
    auto cli = rig.client();
    auto r = cli.send(req);
    EXPECT_TRUE(r && r->status == 200);
  };
  Clock::time_point long_first{}, long_last{}, short_first{}, short_last{};
  std::thread longer(
      [&] { stream(request(mixed_prompts(1, 8, 3)[0], 240, true), &long_first, &long_last); });
  while (rig.metric("generation_tokens_total") < 4) std::this_thread::sleep_for(1ms);
  stream(request({1, 5, 6}, 2, true), &short_first, &short_last);
  longer.join();
  EXPECT_LT(short_first.time_since_epoch().count(), long_last.time_since_epoch().count())
      << "the short request waited for the long one";
  EXPECT_LT(short_last.time_since_epoch().count(), long_last.time_since_epoch().count());
}

TEST(ServeE2E, TinyKvBudgetPreemptsAndStaysExact) {
  Watchdog wd(60);
  ServeConfig c = config(1, 1);
  c.max_model_len = 64;
  // Blocks of 4 positions: 20 blocks hold one full-length sequence and a bit, far less than the
  // 16 requests below want at once, so running sequences are preempted as they grow.
  c.kv_cache_memory = serve::serve_kv_layout(c).block_bytes * 20;
  E2ERig rig(c);
  const int n = 16;
  const auto prompts = mixed_prompts(n, 16, 5);
  const std::vector<int64_t> max_tokens(n, 24);
  const auto want = reference(prompts, max_tokens, true);
  std::vector<std::string> got(n);
  std::vector<std::thread> clients;
  for (int i = 0; i < n; ++i)
    clients.emplace_back(
        [&, i] { got[i] = rig.post(request(prompts[i], 24, true)).get<std::string>(); });
  for (auto& t : clients) t.join();
  for (int i = 0; i < n; ++i)
    EXPECT_EQ(streamed_text(got[i]), rig.text_of(prompts[i], want[i])) << "client " << i;
  EXPECT_GT(rig.metric("num_preemptions_total"), 0);
  EXPECT_EQ(rig.metric("kv_cache_usage_perc"), 0);
}

TEST(ServeE2E, DisconnectsFreeEverythingWithinASecond) {
  Watchdog wd(60);
  E2ERig rig(config(1, 1));
  const int n = 32;
  const auto prompts = mixed_prompts(n, 12, 9);
  std::atomic<int> hung_up{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < n; ++i)
    clients.emplace_back([&, i] {
      httplib::Request req;
      req.method = "POST";
      req.path = "/v1/completions";
      req.body = request(prompts[i], 240, true).dump();
      req.set_header("Content-Type", "application/json");
      int events = 0;
      req.content_receiver = [&](const char* d, size_t len, uint64_t, uint64_t) {
        events += static_cast<int>(std::count(d, d + len, '\n'));
        return events < 6;  // hang up after a few events
      };
      auto cli = rig.client();
      cli.send(req);
      ++hung_up;
    });
  for (auto& t : clients) t.join();
  const auto t0 = Clock::now();
  EXPECT_EQ(hung_up.load(), n);
  double running = -1, usage = -1;
  while (Clock::now() - t0 < 3s) {
    running = rig.metric("num_requests_running");
    usage = rig.metric("kv_cache_usage_perc");
    if (running == 0 && usage == 0 && rig.metric("num_requests_waiting") == 0) break;
    std::this_thread::sleep_for(5ms);
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_EQ(running, 0);
  EXPECT_EQ(usage, 0);
  // 1 s is the promise; the slack covers this test's own 2-core machine, where the 32 client
  // threads, the server's handler threads and the engine's step share the cores, and a handler
  // notices its hang-up only at its next write (the next token).
  EXPECT_LT(s, 1.25) << "requests still held the engine " << s << " s after the clients left";
  // They were cut short, not finished: every one ended as an abort, far from its 240 tokens.
  EXPECT_EQ(rig.metric("request_success_total", "finished_reason=\"abort\""), n);
  EXPECT_EQ(rig.metric("request_success_total", "finished_reason=\"length\""), 0);
  EXPECT_LT(rig.metric("generation_tokens_total"), n * 240 / 2);
}

TEST(ServeE2E, PrefixCacheHitsShowInMetrics) {
  Watchdog wd(60);
  ServeConfig c = config(1, 1);
  c.enable_prefix_caching = true;
  E2ERig rig(c);
  std::vector<int32_t> p = {1};
  for (int i = 0; i < 23; ++i) p.push_back(10 + i * 3);
  const auto want = reference({p}, {8}, true);
  EXPECT_EQ(rig.metric("prefix_cache_hits_total"), 0);
  for (int round = 0; round < 2; ++round) {
    const json a = rig.post(request(p, 8, false));
    EXPECT_EQ(a["choices"][0]["text"], rig.text_of(p, want[0])) << "round " << round;
  }
  EXPECT_GT(rig.metric("prefix_cache_queries_total"), 0);
  // The second request finds the first one's full prompt blocks (24 positions, blocks of 4).
  EXPECT_GE(rig.metric("prefix_cache_hits_total"), 5);
}

// A model that samples ids its tokenizer lacks (here the unpadded test tokenizer, 433 ids, under
// stories260K's 512; in the wild an embedding padded past the tokenizer): those tokens show as no
// text, streamed or not, with logprobs too, and the server lives on (it used to abort the process
// on the stream's thread).
TEST(ServeE2E, IdsPastTheTokenizerShowAsNoText) {
  Watchdog wd(60);
  E2ERig rig(config(1, 1), /*pad=*/false);
  ASSERT_LT(rig.tok->vocab_size(), kModelVocab);
  const std::vector<int32_t> p = rig.tok->encode("Once upon a time", true);
  const auto want = reference({p}, {16}, true);
  ASSERT_TRUE(std::any_of(want[0].begin(), want[0].end(), [&](int32_t id) {
    return id >= rig.tok->vocab_size();
  })) << "the prompt no longer reaches the ids past the tokenizer";
  json body = request(p, 16, false);
  body["prompt"] = "Once upon a time";
  const json a = rig.post(body);
  EXPECT_EQ(a["choices"][0]["text"], rig.text_of(p, want[0]));
  EXPECT_EQ(a["usage"]["completion_tokens"], 16);
  body["stream"] = true;
  body["logprobs"] = 2;
  EXPECT_EQ(streamed_text(rig.post(body).get<std::string>()), rig.text_of(p, want[0]));
  EXPECT_EQ(rig.client().Get("/health")->status, 200);
}

// echo + logprobs: the prompt's tokens carry their logprobs too, each the one the engine gives
// when that prefix alone is the prompt (the prefix request's first sampled token), computed over
// chunked prefills (8 tokens a step), with prefix caching on, under TP 2 and PP 2 as well.
void check_prompt_logprobs(int tp, int pp) {
  Watchdog wd(60);
  ServeConfig c = config(tp, pp);
  c.max_num_batched_tokens = 8;
  c.enable_prefix_caching = true;
  E2ERig rig(c);
  // A prompt whose tokens after the first 5 are the model's greedy continuation: each of those is
  // what a greedy request on its prefix samples, and that request's logprob is the reference.
  const std::vector<int32_t> head = mixed_prompts(1, 5, 21)[0];
  std::vector<int32_t> prompt = head;
  const auto cont = reference({head}, {22}, true);
  prompt.insert(prompt.end(), cont[0].begin(), cont[0].end());
  const size_t plen = prompt.size();
  const std::string prompt_text = rig.tok->decode(prompt);

  json body = request(prompt, 3, false);
  body["echo"] = true;
  body["logprobs"] = 2;
  json whole;  // the non-streamed answer's logprobs
  for (int round = 0; round < 2; ++round) {  // the second: the prompt's blocks are cached
    const json a = rig.post(body);
    const json& ch = a["choices"][0];
    whole = ch["logprobs"];
    const std::string text = ch["text"];
    ASSERT_EQ(text.rfind(prompt_text, 0), 0u) << text;
    const json& lp = ch["logprobs"];
    ASSERT_EQ(lp["tokens"].size(), plen + 3) << lp.dump();
    ASSERT_EQ(lp["token_logprobs"].size(), plen + 3);
    ASSERT_EQ(lp["top_logprobs"].size(), plen + 3);
    ASSERT_EQ(lp["text_offset"].size(), plen + 3);
    EXPECT_TRUE(lp["token_logprobs"][0].is_null());
    EXPECT_TRUE(lp["top_logprobs"][0].is_null());
    EXPECT_EQ(lp["text_offset"][plen], prompt_text.size());
    EXPECT_EQ(a["usage"]["prompt_tokens"], plen);
    EXPECT_EQ(a["usage"]["completion_tokens"], 3);
    for (size_t i = 1; i < plen; ++i) {
      ASSERT_TRUE(lp["token_logprobs"][i].is_number()) << i;
      const double got = lp["token_logprobs"][i];
      EXPECT_LE(got, 0.0);
      EXPECT_EQ(lp["top_logprobs"][i].size(), 2u) << i;
      EXPECT_LE(lp["text_offset"][i - 1].get<size_t>(), lp["text_offset"][i].get<size_t>());
      if (i < head.size()) continue;
      // The prefix alone: its greedy token is prompt[i], with its logprob.
      json pre = request(std::vector<int32_t>(prompt.begin(), prompt.begin() + i), 1, false);
      pre["logprobs"] = 1;
      const json b = rig.post(pre);
      const json& blp = b["choices"][0]["logprobs"];
      ASSERT_EQ(b["choices"][0]["text"], rig.text_of({prompt[i - 1]}, {prompt[i]})) << i;
      EXPECT_NEAR(got, blp["token_logprobs"][0].get<double>(), 1e-5) << "prompt token " << i;
      // prompt[i] is the greedy token: the first of its top list, with the same logprob.
      const std::string piece = lp["tokens"][i];
      ASSERT_TRUE(lp["top_logprobs"][i].contains(piece)) << lp["top_logprobs"][i].dump();
      EXPECT_NEAR(lp["top_logprobs"][i][piece].get<double>(), got, 1e-6);
    }
    // The generated tokens' logprobs are those of the same request without echo.
    json plain = request(prompt, 3, false);
    plain["logprobs"] = 2;
    const json p = rig.post(plain);
    EXPECT_EQ(text, prompt_text + p["choices"][0]["text"].get<std::string>());
    for (size_t k = 0; k < 3; ++k)
      EXPECT_NEAR(lp["token_logprobs"][plen + k].get<double>(),
                  p["choices"][0]["logprobs"]["token_logprobs"][k].get<double>(), 1e-5);
  }

  // max_tokens 0 with echo: the prompt alone (with its logprobs when asked).
  body["max_tokens"] = 0;
  const json z = rig.post(body);
  EXPECT_EQ(z["choices"][0]["text"], prompt_text);
  EXPECT_EQ(z["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(z["usage"]["completion_tokens"], 0);
  EXPECT_EQ(z["choices"][0]["logprobs"]["tokens"].size(), plen);
  body.erase("logprobs");
  const json z2 = rig.post(body);
  EXPECT_EQ(z2["choices"][0]["text"], prompt_text);
  EXPECT_TRUE(z2["choices"][0]["logprobs"].is_null());
  // Without echo, 0 is still refused; streamed echo + logprobs too (said so).
  body["echo"] = false;
  auto r = rig.client().Post("/v1/completions", body.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);

  // Streamed: the first chunk is the prompt with its logprobs, then a chunk per token; together
  // the same arrays as the non-streamed answer.
  json streamed = request(prompt, 3, true);
  streamed["echo"] = true;
  streamed["logprobs"] = 2;
  const auto events = parse_sse(rig.post(streamed).get<std::string>());
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events[0]["choices"][0]["text"], prompt_text);
  EXPECT_EQ(events[0]["choices"][0]["logprobs"]["tokens"].size(), plen);
  json tokens = json::array(), values = json::array(), offsets = json::array();
  for (const json& e : events)
    for (const json& c : e["choices"]) {
      if (c["logprobs"].is_null()) continue;
      for (const json& t : c["logprobs"]["tokens"]) tokens.push_back(t);
      for (const json& t : c["logprobs"]["token_logprobs"]) values.push_back(t);
      for (const json& t : c["logprobs"]["text_offset"]) offsets.push_back(t);
    }
  EXPECT_EQ(tokens, whole["tokens"]);
  EXPECT_EQ(offsets, whole["text_offset"]);
  ASSERT_EQ(values.size(), whole["token_logprobs"].size());
  EXPECT_TRUE(values[0].is_null());
  for (size_t i = 1; i < values.size(); ++i)
    EXPECT_NEAR(values[i].get<double>(), whole["token_logprobs"][i].get<double>(), 1e-5) << i;
  EXPECT_EQ(rig.metric("num_requests_running"), 0);
}

TEST(ServeE2E, EchoPromptLogprobsMatchPrefixRequests) { check_prompt_logprobs(1, 1); }
TEST(ServeE2E, EchoPromptLogprobsMatchPrefixRequestsTp2) { check_prompt_logprobs(2, 1); }
TEST(ServeE2E, EchoPromptLogprobsMatchPrefixRequestsPp2) { check_prompt_logprobs(1, 2); }

// --kv-cache-memory: bytes, bytes with a unit, or a fraction of MemAvailable split over the
// ranks on this machine; anything else is one line naming the flag and the value.
TEST(ServeE2E, KvCacheMemoryBytesUnitsAndFractions) {
  auto parsed = [](const std::string& v) {
    ServeConfig c;
    serve::parse_kv_cache_memory(v, c);
    return std::make_pair(c.kv_cache_memory, c.kv_cache_fraction);
  };
  EXPECT_EQ(parsed("1048576"), std::make_pair(uint64_t{1} << 20, 0.0));
  EXPECT_EQ(parsed("512MiB"), std::make_pair(uint64_t{512} << 20, 0.0));
  EXPECT_EQ(parsed("2GiB"), std::make_pair(uint64_t{2} << 30, 0.0));
  EXPECT_EQ(parsed("2G"), std::make_pair(uint64_t{2} << 30, 0.0));
  EXPECT_EQ(parsed("1.5GB"), std::make_pair(uint64_t{1500000000}, 0.0));
  EXPECT_EQ(parsed("64kib"), std::make_pair(uint64_t{64} << 10, 0.0));
  EXPECT_EQ(parsed("0.5"), std::make_pair(uint64_t{0}, 0.5));
  EXPECT_EQ(parsed("1.0"), std::make_pair(uint64_t{0}, 1.0));
  for (const std::string bad : {"0", "0.0", "1.5", "-1", "abc", "", "5XB", "0.5.1", "1e9", "."}) {
    try {
      parsed(bad);
      ADD_FAILURE() << "'" << bad << "' was accepted";
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("--kv-cache-memory " + bad + ":"), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }

  // A fraction: that share of MemAvailable over the tp x pp x dp ranks (threads: all on this
  // machine), cut into whole blocks.
  ServeConfig c = config(2, 1);
  const serve::KvLayout bytes_layout = serve::serve_kv_layout(c);
  c.kv_cache_fraction = 0.001;
  const serve::KvLayout kv = serve::serve_kv_layout(c);
  const double avail = static_cast<double>(serve::mem_available_bytes());
  EXPECT_EQ(kv.block_bytes, bytes_layout.block_bytes);
  EXPECT_NEAR(static_cast<double>(kv.mem_available), avail, avail * 0.1);
  EXPECT_EQ(kv.budget_bytes,
            static_cast<uint64_t>(0.001 * static_cast<double>(kv.mem_available) / 2));
  EXPECT_EQ(kv.num_blocks, static_cast<int64_t>(kv.budget_bytes / kv.block_bytes));
  EXPECT_GT(kv.num_blocks, 0);
  // Bytes: the budget itself.
  c.kv_cache_fraction = 0;
  c.kv_cache_memory = kv.block_bytes * 7 + 1;
  EXPECT_EQ(serve::serve_kv_layout(c).num_blocks, 7);
  EXPECT_EQ(serve::serve_kv_layout(c).budget_bytes, kv.block_bytes * 7 + 1);
}

// vLLM's expert-parallel layout served (`serve --tp 2 --enable-expert-parallel`) on a tiny
// Mixtral (8 experts, top-2, 160 ids): whole experts over the two TP ranks, one all-reduce per MoE
// layer. Every greedy completion, alone or four at once (batched steps), is what run_generation
// (`parallm generate`) gives the prompt alone on one rank; the test tokenizer covers the 160 ids.
TEST(ServeE2E, ExpertParallelOverTp2MatchesGenerateOnMixtral) {
  Watchdog wd(60);
  TempDir tmp;
  const std::string model = tmp.file("mixtral");
  const auto init =
      run_parallm("init-model --shape mixtral-tiny --seed 5 --dtype f32 --out " + model);
  ASSERT_EQ(init.exit_code, 0) << init.output;
  const std::vector<std::vector<int32_t>> prompts = {
      {1, 7, 11}, {1}, {1, 100, 5, 9, 33, 2, 8}, {1, 42, 42, 17, 150, 3, 99, 64, 12, 5, 77}};
  const int64_t n = 10;
  std::vector<std::vector<int32_t>> want(prompts.size());
  EngineOptions eo;
  eo.model = model;
  eo.backend = "local";
  eo.threads = 1;
  run_model(eo, [&](RankContext& ctx) {
    for (size_t i = 0; i < prompts.size(); ++i) {
      BatchOptions bo;
      bo.max_tokens = n;
      bo.ignore_eos = true;
      want[i] =
          run_generation(ctx.model, ctx.tp, ctx.mesh.pp(), {Request{prompts[i], -1}}, bo)
              .sequences[0]
              .tokens;
      ASSERT_EQ(int64_t(want[i].size()), n);
    }
  });
  ServeConfig c = config(2, 1);
  c.model = model;
  c.enable_expert_parallel = true;
  // The layout is checked before any rank starts, in generate's words: TP 16 exceeds 8 experts.
  ServeConfig wide = c;
  wide.tp = 16;
  EXPECT_EQ(error_of([&] { serve::serve_kv_layout(wide); }),
            "[cli] --enable-expert-parallel at --tp 16 exceeds the model's 8 experts (each TP "
            "rank holds at least one whole expert)");
  E2ERig rig(c);
  EXPECT_TRUE(rig.engine->failure().empty()) << rig.engine->failure();
  for (size_t i = 0; i < prompts.size(); ++i) {
    SCOPED_TRACE("prompt " + std::to_string(i));
    const json a = rig.post(request(prompts[i], n, false));
    EXPECT_FALSE(rig.text_of(prompts[i], want[i]).empty());
    EXPECT_EQ(a["choices"][0]["text"], rig.text_of(prompts[i], want[i]));
    EXPECT_EQ(a["usage"]["completion_tokens"], n);
  }
  std::vector<std::string> got(prompts.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < prompts.size(); ++i)
    clients.emplace_back(
        [&, i] { got[i] = rig.post(request(prompts[i], n, true)).get<std::string>(); });
  for (auto& t : clients) t.join();
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(streamed_text(got[i]), rig.text_of(prompts[i], want[i])) << "client " << i;
}

// Not a test: serve_cli_check.sh runs it (--gtest_also_run_disabled_tests) to get the same
// tokenizer directory for the real `parallm serve`, in $PARALLM_E2E_MODEL_DIR.
TEST(ServeE2E, DISABLED_WriteCliModelDir) {
  const char* dir = std::getenv("PARALLM_E2E_MODEL_DIR");
  ASSERT_NE(dir, nullptr) << "set PARALLM_E2E_MODEL_DIR";
  write_e2e_model_dir(dir);
  EXPECT_EQ(load_tokenizer(dir)->vocab_size(), kModelVocab);
}

}  // namespace
}  // namespace parallm::testing
