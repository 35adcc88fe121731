// HttpServer: the OpenAI-compatible HTTP front of `parallm serve` (docs/serving.md), on
// cpp-httplib. It validates requests, renders chat templates, tokenizes, submits token ids to a
// ServeEngine, detokenizes the token events it gets back (whole UTF-8 characters, stop strings
// found across token boundaries) and answers as JSON or as server-sent events.
//
//   serve::ServeEngine& engine = ...;             // loaded, or still loading (/health says 503)
//   server::ServerOptions opts;  opts.model_dir = dir;  opts.api_key = key;
//   server::HttpServer http(engine, tokenizer, opts);
//   int port = http.listen("0.0.0.0", 8000);      // binds, serves on background threads
//   server::wait_for_signal(http);                // SIGINT/SIGTERM -> http.stop()
//   engine.shutdown();
//
// Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
// GET /metrics, POST /tokenize, POST /detokenize.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "parallm/engine/serve_engine.h"

namespace parallm {
class Tokenizer;
}

namespace parallm::server {

struct ServerOptions {
  std::string api_key;            // non-empty: /v1/* needs "Authorization: Bearer <api_key>"
  std::string model_dir;          // where tokenizer_config.json (chat_template, bos/eos) is read
  std::string chat_template;      // a family name (llama-2, llama-3, chatml, mistral) overriding
                                  // the model's template; "" = detect from tokenizer_config.json
  std::string served_model_name;  // "" = engine.info().name; requests may name either
  int64_t max_pending = 0;        // > 0: requests in flight in the server beyond this get 429
  int http_threads = 256;         // connections served at once (a stream holds one throughout)
  size_t max_body_bytes = 64 << 20;
};

class HttpServer {
 public:
  // Throws std::invalid_argument for an unknown options.chat_template name or an unreadable
  // tokenizer_config.json. The engine and tokenizer must outlive the server.
  HttpServer(serve::ServeEngine& engine, const Tokenizer& tokenizer, ServerOptions options);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds `host`:`port` (0: an ephemeral port) and serves on background threads; returns the
  // bound port. Throws std::runtime_error naming host and port if it cannot bind.
  int listen(const std::string& host, int port);
  // Ends the server: in-flight requests are cancelled in the engine (streams end with an error
  // event and [DONE]), the listening socket closes, and this returns when every handler has left.
  // Idempotent; does not shut the engine down.
  void stop();
  // Blocks until the server stops (stop() from another thread or the server failing).
  void wait();
  bool running() const;

  // Why chat requests are refused (400), "" when the model has a usable template.
  const std::string& chat_template_problem() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Blocks until SIGINT or SIGTERM arrives (or the server stops by itself), then stops `server`.
// Installs handlers for both signals for the duration of the call; returns the signal number (0
// if the server stopped first).
int wait_for_signal(HttpServer& server);

}  // namespace parallm::server
