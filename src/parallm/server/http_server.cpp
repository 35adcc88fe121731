#include "parallm/server/http_server.h"

#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>

#include "parallm/core/error.h"
#include "parallm/model/tokenizer.h"
#include "parallm/model/tokenizer_unicode.h"
#include "parallm/server/chat_template.h"
#include "parallm/server/connection.h"
#include "parallm/server/metrics.h"
#include "parallm/server/socket_options.h"
#include "parallm/server/stop_matcher.h"

namespace parallm::server {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Every JSON body leaves through here: token pieces may hold part of a UTF-8 character, which
// nlohmann would refuse; U+FFFD stands in for it, as in decode().
std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// An answer in OpenAI's error shape.
struct ApiError : std::exception {
  int status = 400;
  std::string message, type = "invalid_request_error", param, code;
  ApiError(int s, std::string m, std::string p = "", std::string t = "invalid_request_error",
           std::string c = "")
      : status(s),
        message(std::move(m)),
        type(std::move(t)),
        param(std::move(p)),
        code(std::move(c)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

json error_json(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(dump(error_json(e)), "application/json");
}

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw ApiError(400, message, param);
}

// ---- typed access to optional request fields ----

const json* field(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<double> opt_number(const json& body, const char* key, double lo, double hi) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad(key, cat("'", key, "' must be a number, got ", v->dump()));
  const double d = v->get<double>();
  if (!(d >= lo && d <= hi)) bad(key, cat("'", key, "' must be in [", lo, ", ", hi, "], got ", d));
  return d;
}

std::optional<int64_t> opt_int(const json& body, const char* key, int64_t lo, int64_t hi) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  int64_t n = 0;
  if (v->is_number_integer()) {
    n = v->get<int64_t>();
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      n = INT64_MAX;
  } else if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>() &&
             std::fabs(v->get<double>()) < 9e18) {
    n = static_cast<int64_t>(v->get<double>());
  } else {
    bad(key, cat("'", key, "' must be an integer, got ", v->dump()));
  }
  if (n < lo || n > hi) bad(key, cat("'", key, "' must be in [", lo, ", ", hi, "], got ", n));
  return n;
}

std::optional<bool> opt_bool(const json& body, const char* key) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) bad(key, cat("'", key, "' must be a boolean, got ", v->dump()));
  return v->get<bool>();
}

// ---- a parsed generation request ----

struct GenRequest {
  bool chat = false;
  std::vector<int32_t> prompt;
  std::string prompt_text;  // echo
  serve::GenParams params;
  std::vector<std::string> stop;
  bool stream = false, include_usage = false, echo = false;
  bool logprobs = false;  // chat: logprobs true; completions: logprobs given
  int top_logprobs = 0;
};

std::vector<ChatMessage> parse_messages(const json& body) {
  const json* m = field(body, "messages");
  if (!m) bad("messages", "'messages' is required");
  if (!m->is_array() || m->empty()) bad("messages", "'messages' must be a non-empty array");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < m->size(); ++i) {
    const json& e = (*m)[i];
    const std::string where = cat("messages[", i, "]");
    if (!e.is_object()) bad("messages", where + " must be an object");
    const json* role = field(e, "role");
    if (!role || !role->is_string()) bad("messages", where + ".role must be a string");
    ChatMessage msg;
    msg.role = role->get<std::string>();
    if (msg.role == "developer") msg.role = "system";  // OpenAI's newer name for it
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant")
      bad("messages", where + ".role '" + msg.role + "' is not system, user or assistant");
    const json* content = field(e, "content");
    if (!content) {
      if (msg.role != "assistant") bad("messages", where + ".content is required");
    } else if (content->is_string()) {
      msg.content = content->get<std::string>();
    } else if (content->is_array()) {
      // Content parts: text only, joined with newlines (as vLLM does).
      bool first = true;
      for (const json& part : *content) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string())
          bad("messages", where + ".content: only parts of type 'text' are supported");
        if (!first) msg.content += "\n";
        msg.content += part["text"].get<std::string>();
        first = false;
      }
    } else {
      bad("messages", where + ".content must be a string or an array of text parts");
    }
    out.push_back(std::move(msg));
  }
  return out;
}

// A token piece as the logprobs fields show it.
json token_bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

// Debian's compiled cpp-httplib listens with a backlog of 5: a burst of clients (a benchmark's
// requests sent at once) overflows it and connections stall or fail. Linux lets listen() be
// called again on the bound socket to raise it; the socket is a protected member.
class Server : public httplib::Server {
 public:
  void raise_backlog(int n) {
    const socket_t fd = svr_sock_;
    if (fd != INVALID_SOCKET) ::listen(fd, n);
  }
};

}  // namespace

// ---- the server ----

struct HttpServer::Impl {
  serve::ServeEngine& engine;
  const Tokenizer& tok;
  ServerOptions opts;
  std::optional<ChatTemplate> chat;
  std::string chat_problem;
  std::string model_name;
  bool tokenizer_knows_specials = false;  // encode("<s>") gives the BOS id
  Server svr;
  std::thread thread;
  std::atomic<bool> stopping{false}, started{false};
  std::atomic<int64_t> in_flight{0};
  std::atomic<int> open_streams{0};  // SSE responses not yet finished
  std::atomic<uint64_t> next_id{1};
  std::mutex seed_mu;
  std::mt19937_64 seed_rng{std::random_device{}()};
  // Shared with the engine's callbacks, which may run after the server is gone (an engine that
  // outlives it and still reports a token of a cancelled request).
  std::shared_ptr<ServerMetrics> metrics = std::make_shared<ServerMetrics>();
  std::mutex active_mu;
  std::set<uint64_t> active;  // engine ids of requests in flight, cancelled by stop()

  Impl(serve::ServeEngine& e, const Tokenizer& t, ServerOptions o)
      : engine(e), tok(t), opts(std::move(o)) {
    use_exclusive_port(svr);
  }

  int64_t max_model_len() const { return engine.info().max_model_len; }

  void check_model(const json& body) {
    const json* m = field(body, "model");
    if (!m) return;  // optional, as in vLLM: the one model served
    if (!m->is_string()) bad("model", "'model' must be a string");
    const std::string name = m->get<std::string>();
    if (name != model_name && name != engine.info().name) {
      throw ApiError(
          404, cat("The model '", name, "' does not exist; this server serves '", model_name, "'"),
          "model", "invalid_request_error", "model_not_found");
    }
  }

  // Chat prompt text -> ids. The template spells BOS/EOS as text; a tokenizer.json maps such
  // text to the special ids itself, a sentencepiece model does not, so there the text is cut at
  // those tokens and the ids put in between.
  std::vector<int32_t> encode_chat(const std::string& text) const {
    if (tokenizer_knows_specials) return tok.encode(text, false);
    std::vector<int32_t> ids;
    const std::string bos = chat ? chat->bos_token() : "", eos = chat ? chat->eos_token() : "";
    size_t pos = 0;
    while (pos <= text.size()) {
      size_t nb = bos.empty() ? std::string::npos : text.find(bos, pos);
      size_t ne = eos.empty() ? std::string::npos : text.find(eos, pos);
      const size_t next = std::min(nb, ne);
      const std::string piece =
          text.substr(pos, next == std::string::npos ? std::string::npos : next - pos);
      if (!piece.empty()) {
        auto part = tok.encode(piece, false);
        ids.insert(ids.end(), part.begin(), part.end());
      }
      if (next == std::string::npos) break;
      if (next == nb && tok.bos_id() >= 0) {
        ids.push_back(tok.bos_id());
        pos = nb + bos.size();
      } else {
        ids.push_back(tok.eos_id());
        pos = ne + eos.size();
      }
    }
    return ids;
  }

  std::vector<int32_t> chat_prompt(const json& body, bool add_generation_prompt) {
    auto messages = parse_messages(body);
    if (!chat) bad("messages", chat_problem);
    std::string text;
    try {
      text = chat->render(messages, add_generation_prompt);
    } catch (const std::invalid_argument& e) {
      bad("messages", e.what());
    }
    return encode_chat(text);
  }

  void check_ids(const std::vector<int32_t>& ids, const char* param) const {
    const int32_t vocab = tok.vocab_size();
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab)
        bad(param,
            cat("'", param, "': token id ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }

  std::vector<int32_t> parse_token_array(const json& a, const char* param) const {
    std::vector<int32_t> ids;
    for (const json& v : a) {
      if (!v.is_number_integer()) bad(param, cat("'", param, "' must hold integers only"));
      const int64_t id = v.get<int64_t>();
      if (id < INT32_MIN || id > INT32_MAX)
        bad(param, cat("'", param, "': token id ", id, " is outside the vocabulary"));
      ids.push_back(static_cast<int32_t>(id));
    }
    check_ids(ids, param);
    return ids;
  }

  GenRequest parse_gen(const json& body, bool chat_route) {
    if (!body.is_object()) bad("", "the request body must be a JSON object");
    check_model(body);
    GenRequest r;
    r.chat = chat_route;
    // Unsupported options refused rather than ignored, so a client never gets something else
    // than it asked for.
    if (auto n = opt_int(body, "n", INT64_MIN, INT64_MAX); n && *n != 1)
      bad("n", cat("'n' must be 1 (one choice per request is supported), got ", *n));
    if (auto b = opt_int(body, "best_of", INT64_MIN, INT64_MAX); b && *b != 1)
      bad("best_of", "'best_of' other than 1 is not supported");
    for (const char* k : {"presence_penalty", "frequency_penalty"}) {
      if (auto v = opt_number(body, k, -2, 2); v && *v != 0)
        bad(k, cat("'", k, "' is not supported (only 0)"));
    }
    if (const json* lb = field(body, "logit_bias"); lb && !(lb->is_object() && lb->empty()))
      bad("logit_bias", "'logit_bias' is not supported");
    if (const json* t = field(body, "tools"); t && !(t->is_array() && t->empty()))
      bad("tools", "'tools' is not supported");
    if (field(body, "suffix")) bad("suffix", "'suffix' is not supported");

    bool explicit_max = false;
    std::string prompt_param = chat_route ? "messages" : "prompt";
    if (chat_route) {
      r.prompt = chat_prompt(body, opt_bool(body, "add_generation_prompt").value_or(true));
      if (auto lp = opt_bool(body, "logprobs")) r.logprobs = *lp;
      if (auto k = opt_int(body, "top_logprobs", 0, 20)) {
        if (!r.logprobs) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
        r.top_logprobs = static_cast<int>(*k);
      }
      if (field(body, "echo")) bad("echo", "'echo' is a completions parameter");
    } else {
      const json* p = field(body, "prompt");
      if (!p) bad("prompt", "'prompt' is required");
      if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array()))
        p = &(*p)[0];  // a batch of one
      if (p->is_string()) {
        r.prompt_text = p->get<std::string>();
        r.prompt = tok.encode(r.prompt_text, true);  // BOS, as `parallm generate` adds it
      } else if (p->is_array()) {
        if (!p->empty() && !(*p)[0].is_number_integer())
          bad("prompt", "'prompt' must be a string, an array of token ids, or a batch of one");
        r.prompt = parse_token_array(*p, "prompt");  // used exactly as given
        r.prompt_text = tok.decode(r.prompt);
      } else {
        bad("prompt", "'prompt' must be a string or an array of token ids");
      }
      // The number of top tokens; `false` (some clients send it) means none.
      const json* l = field(body, "logprobs");
      if (l && l->is_boolean()) {
        if (l->get<bool>())
          bad("logprobs", "'logprobs' for completions is the number of top tokens (0..20)");
      } else if (auto lp = opt_int(body, "logprobs", 0, 20)) {
        r.logprobs = true;
        r.top_logprobs = static_cast<int>(*lp);
      }
      r.echo = opt_bool(body, "echo").value_or(false);
    }
    if (r.prompt.empty()) bad(prompt_param, cat("'", prompt_param, "' gives no tokens"));

    const int64_t len = max_model_len();
    const int64_t plen = static_cast<int64_t>(r.prompt.size());
    // 0 with echo: the prompt alone (and its logprobs), as OpenAI's legacy completions allow.
    const int64_t min_tokens = r.echo ? 0 : 1;
    std::optional<int64_t> mt = opt_int(body, "max_tokens", min_tokens, INT64_MAX / 4);
    std::string max_param = "max_tokens";
    if (auto mct = opt_int(body, "max_completion_tokens", min_tokens, INT64_MAX / 4)) {
      mt = mct;
      max_param = "max_completion_tokens";
    }
    explicit_max = mt.has_value();
    int64_t max_tokens = mt ? *mt : chat_route && len > 0 ? len - plen : 16;
    if (len > 0 && (plen >= len || plen + max_tokens > len)) {
      throw ApiError(
          400,
          cat("This model's maximum context length is ", len, " tokens. However, you requested ",
              plen + max_tokens, " tokens (", plen, " in the ", prompt_param, ", ", max_tokens,
              " for the completion). Please reduce the length of the ", prompt_param, " or ",
              max_param, "."),
          explicit_max && plen < len ? max_param : prompt_param, "invalid_request_error",
          "context_length_exceeded");
    }
    r.params.max_tokens = max_tokens;
    r.params.temperature = static_cast<float>(opt_number(body, "temperature", 0, 2).value_or(1.0));
    if (auto tp = opt_number(body, "top_p", 0, 1)) {
      if (*tp <= 0) bad("top_p", "'top_p' must be in (0, 1]");
      r.params.top_p = static_cast<float>(*tp);
    }
    if (auto k = opt_int(body, "top_k", -1, INT32_MAX))
      r.params.top_k = *k < 0 ? 0 : static_cast<int>(*k);
    // No seed: a fresh one per request, so that sampled requests differ (as OpenAI's do); with
    // one, the engine gives the same tokens for it at any load.
    if (auto s = opt_int(body, "seed", INT64_MIN, INT64_MAX)) {
      r.params.seed = static_cast<uint64_t>(*s);
    } else {
      std::lock_guard<std::mutex> lock(seed_mu);
      r.params.seed = seed_rng();
    }
    r.params.ignore_eos = opt_bool(body, "ignore_eos").value_or(false);
    r.params.top_logprobs = r.logprobs ? r.top_logprobs : -1;
    // echo + logprobs: the prompt's logprobs too. max_tokens 0 also goes through the engine as
    // a prompt-logprobs request (the one kind that may generate nothing).
    if (r.echo && (r.logprobs || max_tokens == 0)) {
      r.params.prompt_logprobs = true;
      if (r.params.top_logprobs < 0) r.params.top_logprobs = 0;
    }

    if (const json* s = field(body, "stop")) {
      if (s->is_string()) {
        r.stop.push_back(s->get<std::string>());
      } else if (s->is_array()) {
        for (const json& e : *s) {
          if (!e.is_string()) bad("stop", "'stop' must be a string or an array of strings");
          r.stop.push_back(e.get<std::string>());
        }
      } else {
        bad("stop", "'stop' must be a string or an array of strings");
      }
      if (r.stop.size() > 16) bad("stop", "'stop' holds at most 16 strings");
      for (const auto& e : r.stop)
        if (e.empty()) bad("stop", "'stop' strings must not be empty");
    }
    r.stream = opt_bool(body, "stream").value_or(false);
    if (const json* so = field(body, "stream_options")) {
      if (!r.stream) bad("stream_options", "'stream_options' is only allowed with 'stream': true");
      if (!so->is_object()) bad("stream_options", "'stream_options' must be an object");
      r.include_usage = opt_bool(*so, "include_usage").value_or(false);
    }
    return r;
  }

  json usage(int64_t prompt, int64_t completion) const {
    return {{"prompt_tokens", prompt},
            {"completion_tokens", completion},
            {"total_tokens", prompt + completion}};
  }

  void register_routes();
  void handle_generate(const httplib::Request& req, httplib::Response& res, bool chat_route);
};

namespace {

// What the engine's callbacks hand over to the request's handler thread.
struct Inbox {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<serve::TokenEvent> tokens;
  bool finished = false;
  serve::FinishEvent finish;
  std::vector<serve::TokenEvent> prompt_lp;  // prompt tokens 1.. (echo + logprobs)
  Clock::time_point arrival, last;
  bool any = false;
};

// The text of token `id` after `prev`. A model may sample ids its tokenizer lacks (an embedding
// padded past the tokenizer's vocabulary, a random model): they show as no text, as in vLLM,
// where decode_token would throw on the stream's thread and end the process.
std::string piece_of(const Tokenizer& tok, int32_t prev, int32_t id) {
  const auto n = tok.vocab_size();
  if (id < 0 || id >= n) return {};
  return tok.decode_token(prev >= 0 && prev < n ? prev : -1, id);
}

// Generated tokens -> whole UTF-8 characters, as TokenStreamer does, but decoded after the
// prompt's last token: a completion continues its prompt, so "Once upon a" + "▁time" shows
// " time" (TokenStreamer starts a fresh text and would drop that space).
class TextStreamer {
 public:
  TextStreamer(const Tokenizer& tok, int32_t prev) : tok_(tok), prev_(prev) {}
  std::string push(int32_t id) {
    pending_ += piece_of(tok_, prev_, id);
    prev_ = id;
    const size_t done = unicode::complete_utf8_prefix(pending_);
    std::string out = unicode::sanitize_utf8(std::string_view(pending_).substr(0, done));
    pending_.erase(0, done);
    return out;
  }
  std::string finish() {
    std::string out = unicode::sanitize_utf8(pending_);
    pending_.clear();
    return out;
  }

 private:
  const Tokenizer& tok_;
  int32_t prev_;
  std::string pending_;
};

// One output step: text to show (after stop-string hold-back) and the token it came with.
struct Out {
  std::string text;
  bool has_token = false;
  serve::TokenEvent ev;
  std::string piece;  // the token's own text, for logprobs
};

// One request from submit to its end: turns token events into text, finds stop strings, and
// cancels the engine request when it ends early (stop string, client gone, server stopping).
class Generation {
 public:
  Generation(HttpServer::Impl& s, const GenRequest& r)
      : srv_(s),
        req_(r),
        streamer_(s.tok, r.prompt.back()),
        stop_(r.stop),
        prev_(r.prompt.back()) {}
  ~Generation() {
    cancel();
    if (submitted_) srv_.in_flight.fetch_sub(1);
  }

  void start() {
    if (!srv_.engine.ready() || srv_.stopping)
      throw ApiError(503, "the model is not ready yet", "", "service_unavailable");
    if (srv_.opts.max_pending > 0 && srv_.in_flight.load() >= srv_.opts.max_pending)
      throw ApiError(429, cat("too many requests in flight (", srv_.opts.max_pending, ")"), "",
                     "rate_limit_exceeded", "rate_limit_exceeded");
    inbox_ = std::make_shared<Inbox>();
    inbox_->arrival = Clock::now();
    serve::RequestCallbacks cb;
    std::shared_ptr<Inbox> in = inbox_;
    std::shared_ptr<ServerMetrics> m = srv_.metrics;
    cb.on_token = [in, m](const serve::TokenEvent& ev) {
      const auto now = Clock::now();
      std::lock_guard<std::mutex> lock(in->mu);
      if (!in->any) {
        m->ttft.observe(std::chrono::duration<double>(now - in->arrival).count());
      } else {
        m->itl.observe(std::chrono::duration<double>(now - in->last).count());
      }
      in->any = true;
      in->last = now;
      in->tokens.push_back(ev);
      in->cv.notify_all();
    };
    cb.on_prompt_logprobs = [in](const std::vector<serve::TokenEvent>& lp) {
      std::lock_guard<std::mutex> lock(in->mu);
      in->prompt_lp = lp;
      in->cv.notify_all();
    };
    cb.on_finish = [in](const serve::FinishEvent& ev) {
      std::lock_guard<std::mutex> lock(in->mu);
      in->finished = true;
      in->finish = ev;
      in->cv.notify_all();
    };
    serve::Submission sub{req_.prompt, req_.params};
    srv_.in_flight.fetch_add(1);
    submitted_ = true;
    try {
      id_ = srv_.engine.submit(std::move(sub), std::move(cb));
    } catch (const serve::QueueFull& e) {
      throw ApiError(429, cat("the server's queue is full: ", e.what()), "", "rate_limit_exceeded",
                     "rate_limit_exceeded");
    } catch (const std::invalid_argument& e) {
      throw ApiError(400, e.what());
    }
    running_ = true;
    {
      std::lock_guard<std::mutex> lock(srv_.active_mu);
      srv_.active.insert(id_);
    }
    // stop() may have cancelled the active set before this request joined it.
    if (srv_.stopping) cancel();
  }

  // Waits up to `wait` for events and turns them into `outs`; true once the request is over
  // (finish_reason() set, or error()).
  bool poll(std::chrono::milliseconds wait, std::vector<Out>& outs) {
    if (done_) return true;
    std::deque<serve::TokenEvent> tokens;
    bool finished = false;
    serve::FinishEvent fin;
    {
      std::unique_lock<std::mutex> lock(inbox_->mu);
      inbox_->cv.wait_for(lock, wait, [&] { return !inbox_->tokens.empty() || inbox_->finished; });
      tokens.swap(inbox_->tokens);
      finished = inbox_->finished;
      fin = inbox_->finish;
    }
    for (const serve::TokenEvent& ev : tokens) {
      if (done_) break;
      ++completion_tokens_;
      Out o;
      o.has_token = true;
      o.ev = ev;
      if (req_.logprobs) o.piece = piece_of(srv_.tok, prev_, ev.token);
      o.text = stop_.push(streamer_.push(ev.token));
      prev_ = ev.token;
      outs.push_back(std::move(o));
      if (stop_.stopped()) end("stop");
    }
    if (!done_ && finished) {
      switch (fin.reason) {
        case serve::FinishReason::Stop:
        case serve::FinishReason::Length: {
          std::string tail = stop_.push(streamer_.finish());
          if (!stop_.stopped()) tail += stop_.finish();
          if (!tail.empty()) {
            Out o;
            o.text = std::move(tail);
            outs.push_back(std::move(o));
          }
          end(stop_.stopped() || fin.reason == serve::FinishReason::Stop ? "stop" : "length");
          break;
        }
        case serve::FinishReason::Cancelled:
          fail_with(503, "the request was cancelled: the server is shutting down",
                    "service_unavailable");
          break;
        case serve::FinishReason::Error:
          fail_with(500, "the engine failed: " + fin.error, "server_error");
          break;
      }
      running_ = false;
      forget();
    }
    if (!done_ && srv_.stopping) {
      fail_with(503, "the server is shutting down", "service_unavailable");
    }
    return done_;
  }

  // Ends the engine request if it still runs (a stop string, a client gone, a server stopping).
  void cancel() {
    if (running_) {
      srv_.engine.cancel(id_);
      running_ = false;
      forget();
      // Not finished yet: the client went away (or the handler gave up), an abort as vLLM counts
      // it; end() and fail_with() set done_ first and count their own reason.
      if (!done_) srv_.metrics->count_finished("abort");
    }
  }

  const std::string& finish_reason() const { return finish_reason_; }
  std::vector<serve::TokenEvent> prompt_logprobs() const {
    std::lock_guard<std::mutex> lock(inbox_->mu);
    return inbox_->prompt_lp;
  }
  // Whether the prompt's logprobs are in (or will never come): the engine hands them over before
  // the first token, so any token or the end means they are settled. Waits up to `wait`.
  bool prompt_logprobs_settled(std::chrono::milliseconds wait) const {
    std::unique_lock<std::mutex> lock(inbox_->mu);
    auto settled = [&] {
      return !inbox_->prompt_lp.empty() || !inbox_->tokens.empty() || inbox_->finished ||
             req_.prompt.size() < 2;
    };
    return settled() || inbox_->cv.wait_for(lock, wait, settled);
  }
  const std::optional<ApiError>& error() const { return error_; }
  int64_t completion_tokens() const { return completion_tokens_; }
  int64_t prompt_tokens() const { return static_cast<int64_t>(req_.prompt.size()); }

 private:
  void end(const std::string& reason) {
    finish_reason_ = reason;
    done_ = true;
    cancel();
    srv_.metrics->count_finished(reason);
    srv_.metrics->e2e.observe(
        std::chrono::duration<double>(Clock::now() - inbox_->arrival).count());
  }
  void fail_with(int status, const std::string& msg, const std::string& type) {
    error_ = ApiError(status, msg, "", type);
    done_ = true;
    cancel();
    srv_.metrics->count_finished(status == 503 ? "abort" : "error");
  }
  void forget() {
    std::lock_guard<std::mutex> lock(srv_.active_mu);
    srv_.active.erase(id_);
  }

  HttpServer::Impl& srv_;
  const GenRequest& req_;
  TextStreamer streamer_;
  StopMatcher stop_;
  std::shared_ptr<Inbox> inbox_;
  int32_t prev_ = -1;
  uint64_t id_ = 0;
  bool submitted_ = false, running_ = false, done_ = false;
  int64_t completion_tokens_ = 0;
  std::string finish_reason_;
  std::optional<ApiError> error_;
};

// The logprobs of one token in the completions layout (parallel arrays) or the chat layout.
struct LogprobsBuilder {
  const Tokenizer& tok;
  bool chat;
  json tokens = json::array(), token_logprobs = json::array(), top = json::array(),
       offsets = json::array(), content = json::array();
  void add(const Out& o, int32_t prev, size_t text_offset) {
    if (chat) {
      json entry = {{"token", o.piece}, {"logprob", o.ev.logprob}, {"bytes", token_bytes(o.piece)}};
      json tops = json::array();
      for (const auto& t : o.ev.top) {
        const std::string p = piece_of(tok, prev, t.token);
        tops.push_back({{"token", p}, {"logprob", t.logprob}, {"bytes", token_bytes(p)}});
      }
      entry["top_logprobs"] = tops;
      content.push_back(entry);
    } else {
      tokens.push_back(o.piece);
      token_logprobs.push_back(o.ev.logprob);
      json tops = json::object();
      for (const auto& t : o.ev.top) tops[piece_of(tok, prev, t.token)] = t.logprob;
      top.push_back(tops);
      offsets.push_back(text_offset);
    }
  }
  // Completions with echo: the prompt's tokens first; token 0 has no logprob (null), token i
  // its logprob given tokens 0..i-1 (plp[i - 1]).
  void add_prompt(const std::vector<int32_t>& prompt, const std::vector<serve::TokenEvent>& plp,
                  size_t text_size) {
    size_t offset = 0;
    for (size_t i = 0; i < prompt.size(); ++i) {
      const int32_t prev = i > 0 ? prompt[i - 1] : -1;
      const std::string piece = piece_of(tok, prev, prompt[i]);
      tokens.push_back(piece);
      offsets.push_back(std::min(offset, text_size));
      offset += piece.size();
      if (i == 0 || i - 1 >= plp.size()) {
        token_logprobs.push_back(nullptr);
        top.push_back(nullptr);
        continue;
      }
      const serve::TokenEvent& e = plp[i - 1];
      token_logprobs.push_back(e.logprob);
      json tops = json::object();
      for (const auto& t : e.top) tops[piece_of(tok, prev, t.token)] = t.logprob;
      top.push_back(tops);
    }
  }
  json result() const {
    if (chat) return {{"content", content}};
    return {{"tokens", tokens},
            {"token_logprobs", token_logprobs},
            {"top_logprobs", top},
            {"text_offset", offsets}};
  }
};

std::string new_id(HttpServer::Impl& s, bool chat) {
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%s-%016llx", chat ? "chatcmpl" : "cmpl",
                static_cast<unsigned long long>(s.next_id.fetch_add(1)) ^
                    (static_cast<unsigned long long>(std::time(nullptr)) << 24));
  return buf;
}

// A streamed request's state, shared by httplib's content provider calls.
struct StreamState {
  GenRequest req;
  std::unique_ptr<Generation> gen;
  std::string id;
  int64_t created = 0;
  bool opened = false, closed = false;
  size_t text_len = 0;  // text sent so far (completions' text_offset)
  int32_t prev = -1;
  ConnectionProbe probe;  // the client's socket, polled while there is nothing to write
};

}  // namespace

void HttpServer::Impl::handle_generate(const httplib::Request& req, httplib::Response& res,
                                       bool chat_route) {
  json body;
  try {
    body = json::parse(req.body);
  } catch (const json::exception& e) {
    throw ApiError(400, cat("the request body is not valid JSON: ", e.what()));
  }
  auto st = std::make_shared<StreamState>();
  st->req = parse_gen(body, chat_route);
  st->id = new_id(*this, chat_route);
  st->created = static_cast<int64_t>(std::time(nullptr));
  st->prev = st->req.prompt.back();
  st->gen = std::make_unique<Generation>(*this, st->req);
  st->gen->start();  // 429 / 503 / 400 from the engine: still a plain JSON answer
  st->probe = ConnectionProbe(req.local_addr, req.local_port, req.remote_addr, req.remote_port);
  const std::string model = model_name;
  const bool chat_r = chat_route;

  if (!st->req.stream) {
    std::vector<Out> outs;
    std::string text = st->req.echo ? st->req.prompt_text : "";
    LogprobsBuilder lp{tok, chat_r};
    const bool prompt_lp = st->req.echo && st->req.logprobs;
    int32_t prev = st->prev;
    while (true) {
      outs.clear();
      const bool done = st->gen->poll(100ms, outs);
      for (const Out& o : outs) {
        if (o.has_token && st->req.logprobs) {
          lp.add(o, prev, text.size());
          prev = o.ev.token;
        }
        text += o.text;
      }
      if (done) break;
      // Nobody will read the answer: the engine request ends now, not at its last token.
      if (st->probe.closed()) {
        st->gen->cancel();
        res.status = 499;  // nginx's "client closed request"; never reaches the client
        return;
      }
    }
    if (st->gen->error()) throw *st->gen->error();
    json lpj = st->req.logprobs ? lp.result() : json(nullptr);
    if (prompt_lp) {
      LogprobsBuilder all{tok, false};
      all.add_prompt(st->req.prompt, st->gen->prompt_logprobs(), st->req.prompt_text.size());
      for (size_t i = 0; i < lp.tokens.size(); ++i) {
        all.tokens.push_back(lp.tokens[i]);
        all.token_logprobs.push_back(lp.token_logprobs[i]);
        all.top.push_back(lp.top[i]);
        all.offsets.push_back(lp.offsets[i]);
      }
      lpj = all.result();
    }
    json choice = {{"index", 0},
                   {"logprobs", lpj},
                   {"finish_reason", st->gen->finish_reason()}};
    if (chat_r) {
      choice["message"] = {{"role", "assistant"}, {"content", text}};
    } else {
      choice["text"] = text;
    }
    json out = {{"id", st->id},
                {"object", chat_r ? "chat.completion" : "text_completion"},
                {"created", st->created},
                {"model", model},
                {"choices", json::array({choice})},
                {"usage", usage(st->gen->prompt_tokens(), st->gen->completion_tokens())}};
    res.status = 200;
    res.set_content(dump(out), "application/json");
    return;
  }

  // Streaming: one `data: {chunk}\n\n` per token (text held back for a stop string is sent with
  // a later token), a final chunk with finish_reason, the usage chunk, then [DONE].
  res.status = 200;
  res.set_header("Cache-Control", "no-cache");
  auto chunk = [st, model, chat_r](json choice) {
    json c = {{"id", st->id},
              {"object", chat_r ? "chat.completion.chunk" : "text_completion"},
              {"created", st->created},
              {"model", model},
              {"choices", json::array({std::move(choice)})}};
    return "data: " + dump(c) + "\n\n";
  };
  Impl* self = this;
  open_streams.fetch_add(1);
  res.set_chunked_content_provider(
      "text/event-stream",
      [st, chunk, chat_r, self](size_t, httplib::DataSink& sink) -> bool {
        if (st->closed) {
          sink.done();
          return true;
        }
        std::string data;
        if (!st->opened && st->req.echo && st->req.logprobs) {
          // The echo chunk carries the prompt's logprobs: it waits for them (the prefill).
          if (!st->gen->prompt_logprobs_settled(50ms)) {
            if (st->probe.closed()) return false;
            return true;
          }
          st->opened = true;
          LogprobsBuilder lp{self->tok, false};
          lp.add_prompt(st->req.prompt, st->gen->prompt_logprobs(), st->req.prompt_text.size());
          data += chunk({{"index", 0},
                         {"text", st->req.prompt_text},
                         {"logprobs", lp.result()},
                         {"finish_reason", nullptr}});
          st->text_len = st->req.prompt_text.size();
        }
        if (!st->opened) {
          st->opened = true;
          if (chat_r) {
            data += chunk({{"index", 0},
                           {"delta", {{"role", "assistant"}, {"content", ""}}},
                           {"logprobs", nullptr},
                           {"finish_reason", nullptr}});
          } else if (st->req.echo) {
            data += chunk({{"index", 0},
                           {"text", st->req.prompt_text},
                           {"logprobs", nullptr},
                           {"finish_reason", nullptr}});
            st->text_len = st->req.prompt_text.size();
          }
        }
        std::vector<Out> outs;
        const bool done = st->gen->poll(data.empty() ? 50ms : 0ms, outs);
        for (const Out& o : outs) {
          const bool with_lp = o.has_token && st->req.logprobs;
          if (o.text.empty() && !with_lp) continue;
          json lpj = nullptr;
          if (with_lp) {
            LogprobsBuilder lp{self->tok, chat_r};
            lp.add(o, st->prev, st->text_len);
            lpj = lp.result();
          }
          if (o.has_token) st->prev = o.ev.token;
          json choice = {{"index", 0}, {"logprobs", lpj}, {"finish_reason", nullptr}};
          if (chat_r) {
            choice["delta"] = {{"content", o.text}};
          } else {
            choice["text"] = o.text;
          }
          data += chunk(choice);
          st->text_len += o.text.size();
        }
        if (done) {
          if (st->gen->error()) {
            // The headers are gone: the error travels as an event of its own.
            data += "data: " + dump(error_json(*st->gen->error())) + "\n\n";
          } else {
            json choice = {
                {"index", 0}, {"logprobs", nullptr}, {"finish_reason", st->gen->finish_reason()}};
            if (chat_r) {
              choice["delta"] = json::object();
            } else {
              choice["text"] = "";
            }
            data += chunk(choice);
            if (st->req.include_usage) {
              json c = {
                  {"id", st->id},
                  {"object", chat_r ? "chat.completion.chunk" : "text_completion"},
                  {"created", st->created},
                  {"model", self->model_name},
                  {"choices", json::array()},
                  {"usage", self->usage(st->gen->prompt_tokens(), st->gen->completion_tokens())}};
              data += "data: " + dump(c) + "\n\n";
            }
          }
          data += "data: [DONE]\n\n";
          st->closed = true;
        }
        // A failed write means the client is gone: returning false ends the response, and the
        // releaser below cancels the engine request. With nothing to write (still queued, a
        // prefill, text held for a stop string) the socket itself says so.
        if (data.empty() && st->probe.closed()) return false;
        if (!data.empty() && !sink.write(data.data(), data.size())) return false;
        if (done) sink.done();
        return true;
      },
      [st, self](bool) {
        st->gen->cancel();
        self->open_streams.fetch_sub(1);
      });
}

void HttpServer::Impl::register_routes() {
  auto guard = [](auto fn) {
    return [fn](const httplib::Request& req, httplib::Response& res) {
      try {
        fn(req, res);
      } catch (const ApiError& e) {
        send_error(res, e);
      } catch (const std::invalid_argument& e) {
        send_error(res, ApiError(400, e.what()));
      } catch (const std::exception& e) {
        send_error(res, ApiError(500, cat("internal error: ", e.what()), "", "server_error"));
      }
    };
  };
  auto parse_body = [](const httplib::Request& req) {
    try {
      json b = json::parse(req.body);
      if (!b.is_object()) bad("", "the request body must be a JSON object");
      return b;
    } catch (const json::exception& e) {
      throw ApiError(400, cat("the request body is not valid JSON: ", e.what()));
    }
  };

  svr.Post("/v1/completions", guard([this](const httplib::Request& q, httplib::Response& r) {
             handle_generate(q, r, false);
           }));
  svr.Post("/v1/chat/completions", guard([this](const httplib::Request& q, httplib::Response& r) {
             handle_generate(q, r, true);
           }));
  auto model_card = [this] {
    return json{{"id", model_name},
                {"object", "model"},
                {"created", static_cast<int64_t>(std::time(nullptr))},
                {"owned_by", "parallm"},
                {"root", engine.info().name},
                {"max_model_len", max_model_len()},
                {"vocab_size", tok.vocab_size()}};
  };
  svr.Get("/v1/models", guard([model_card](const httplib::Request&, httplib::Response& r) {
            r.set_content(dump({{"object", "list"}, {"data", json::array({model_card()})}}),
                          "application/json");
          }));
  svr.Get(R"(/v1/models/(.+))",
          guard([this, model_card](const httplib::Request& q, httplib::Response& r) {
            const std::string name = q.matches[1];
            if (name != model_name && name != engine.info().name)
              throw ApiError(404, cat("The model '", name, "' does not exist"), "model",
                             "invalid_request_error", "model_not_found");
            r.set_content(dump(model_card()), "application/json");
          }));
  svr.Get("/health", [this](const httplib::Request&, httplib::Response& r) {
    const bool ok = engine.ready() && !stopping;
    r.status = ok ? 200 : 503;
    r.set_content(ok ? "{\"status\":\"ok\"}" : "{\"status\":\"loading\"}", "application/json");
  });
  svr.Get("/metrics", guard([this](const httplib::Request&, httplib::Response& r) {
            r.set_content(metrics->render(model_name, engine.stats()),
                          "text/plain; version=0.0.4; charset=utf-8");
          }));
  svr.Post("/tokenize", guard([this, parse_body](const httplib::Request& q, httplib::Response& r) {
             const json body = parse_body(q);
             check_model(body);
             std::vector<int32_t> ids;
             if (field(body, "messages")) {
               ids = chat_prompt(body, opt_bool(body, "add_generation_prompt").value_or(true));
             } else {
               const json* p = field(body, "prompt");
               if (!p || !p->is_string())
                 bad("prompt", "'prompt' (a string) or 'messages' is required");
               ids = tok.encode(p->get<std::string>(),
                                opt_bool(body, "add_special_tokens").value_or(true));
             }
             r.set_content(
                 dump({{"tokens", ids}, {"count", ids.size()}, {"max_model_len", max_model_len()}}),
                 "application/json");
           }));
  svr.Post("/detokenize",
           guard([this, parse_body](const httplib::Request& q, httplib::Response& r) {
             const json body = parse_body(q);
             check_model(body);
             const json* t = field(body, "tokens");
             if (!t || !t->is_array())
               bad("tokens", "'tokens' (an array of token ids) is required");
             const auto ids = parse_token_array(*t, "tokens");
             r.set_content(dump({{"prompt", tok.decode(ids)}}), "application/json");
           }));

  // A known path with the wrong method: 405 with Allow (httplib alone would say 404).
  const std::pair<const char*, const char*> routes[] = {
      {"/v1/completions", "POST"}, {"/v1/chat/completions", "POST"},
      {"/v1/models", "GET"},       {R"(/v1/models/(.+))", "GET"},
      {"/health", "GET"},          {"/metrics", "GET"},
      {"/tokenize", "POST"},       {"/detokenize", "POST"}};
  for (const auto& [path, allowed] : routes) {
    const std::string allow = allowed;
    auto refuse = [allow](const httplib::Request& q, httplib::Response& r) {
      r.set_header("Allow", allow);
      send_error(
          r, ApiError(405, cat("method ", q.method, " is not allowed on ", q.path, "; use ", allow),
                      "", "invalid_request_error", "method_not_allowed"));
    };
    if (allow != "GET") svr.Get(path, refuse);
    if (allow != "POST") svr.Post(path, httplib::Server::Handler(refuse));
    svr.Put(path, httplib::Server::Handler(refuse));
    svr.Patch(path, httplib::Server::Handler(refuse));
    svr.Delete(path, httplib::Server::Handler(refuse));
  }

  svr.set_pre_routing_handler([this](const httplib::Request& q, httplib::Response& r) {
    if (opts.api_key.empty() || q.path.rfind("/v1/", 0) != 0)
      return httplib::Server::HandlerResponse::Unhandled;
    const std::string want = "Bearer " + opts.api_key;
    if (q.get_header_value("Authorization") == want)
      return httplib::Server::HandlerResponse::Unhandled;
    r.set_header("WWW-Authenticate", "Bearer");
    send_error(r, ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "",
                           "invalid_request_error", "invalid_api_key"));
    return httplib::Server::HandlerResponse::Handled;
  });
  // Statuses httplib sets itself (unknown route, a body over the limit, a malformed request)
  // get a JSON body too.
  svr.set_error_handler([](const httplib::Request& q, httplib::Response& r) {
    if (!r.body.empty()) return;
    if (r.status == 404) {
      send_error(r, ApiError(404, cat("no route ", q.method, " ", q.path), "",
                             "invalid_request_error", "not_found"));
    } else {
      send_error(r, ApiError(r.status, cat("HTTP error ", r.status), "",
                             r.status >= 500 ? "server_error" : "invalid_request_error"));
    }
  });
  svr.set_exception_handler(
      [](const httplib::Request&, httplib::Response& r, std::exception_ptr ep) {
        std::string what = "unknown";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        send_error(r, ApiError(500, "internal error: " + what, "", "server_error"));
      });
}

HttpServer::HttpServer(serve::ServeEngine& engine, const Tokenizer& tokenizer,
                       ServerOptions options)
    : impl_(std::make_unique<Impl>(engine, tokenizer, std::move(options))) {
  Impl& s = *impl_;
  // A client that goes away mid-stream must not kill the process with SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  s.model_name = s.opts.served_model_name.empty() ? engine.info().name : s.opts.served_model_name;
  s.chat = load_chat_template(s.opts.model_dir, s.opts.chat_template, &tokenizer, &s.chat_problem);
  if (s.chat && !s.chat->bos_token().empty() && tokenizer.bos_id() >= 0) {
    const auto ids = tokenizer.encode(s.chat->bos_token(), false);
    s.tokenizer_knows_specials = ids.size() == 1 && ids[0] == tokenizer.bos_id();
  }
  const int threads = std::max(4, s.opts.http_threads);
  s.svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.svr.set_payload_max_length(s.opts.max_body_bytes);
  s.svr.set_keep_alive_timeout(2);  // idle keep-alive connections hold a thread; stop() waits
  s.svr.set_tcp_nodelay(true);      // one small event per token
  s.register_routes();
}

HttpServer::~HttpServer() {
  stop();
}

int HttpServer::listen(const std::string& host, int port) {
  Impl& s = *impl_;
  if (s.started.exchange(true)) throw std::logic_error("HttpServer::listen: already listening");
  int bound = -1;
  if (port == 0) {
    bound = s.svr.bind_to_any_port(host);
  } else if (s.svr.bind_to_port(host, port)) {
    bound = port;
  }
  if (bound <= 0) {
    s.started = false;
    fail<std::runtime_error>("serve", "cannot listen on ", host, ":", port,
                             " (address in use, or not an address of this host)");
  }
  s.svr.raise_backlog(1024);
  s.thread = std::thread([&s] { s.svr.listen_after_bind(); });
  // The socket already listens (connections queue in the kernel); wait for the accept loop so
  // that running() means what it says from here on.
  for (int i = 0; i < 2000 && !s.svr.is_running(); ++i) std::this_thread::sleep_for(1ms);
  return bound;
}

void HttpServer::stop() {
  Impl& s = *impl_;
  s.stopping = true;
  {
    std::lock_guard<std::mutex> lock(s.active_mu);
    for (uint64_t id : s.active) s.engine.cancel(id);
  }
  // Let open streams write their closing error event and [DONE] (their next poll sees
  // `stopping`) before httplib stops calling their providers.
  for (int i = 0; i < 200 && s.open_streams.load() > 0; ++i) std::this_thread::sleep_for(5ms);
  s.svr.stop();
  if (s.thread.joinable()) s.thread.join();
}

void HttpServer::wait() {
  while (running()) std::this_thread::sleep_for(50ms);
}

bool HttpServer::running() const {
  return impl_->svr.is_running() && !impl_->stopping;
}

const std::string& HttpServer::chat_template_problem() const {
  return impl_->chat_problem;
}

namespace {
volatile sig_atomic_t g_signal = 0;
extern "C" void on_signal(int sig) {
  g_signal = sig;
}
}  // namespace

int wait_for_signal(HttpServer& server) {
  g_signal = 0;
  struct sigaction sa {
  }, old_int{}, old_term{};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  while (!g_signal && server.running()) std::this_thread::sleep_for(50ms);
  const int sig = g_signal;
  server.stop();
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  return sig;
}

}  // namespace parallm::server
