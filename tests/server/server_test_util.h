// Shared by the server tests: a temp model directory, a fake engine and an HttpServer on an
// ephemeral loopback port, plus raw-HTTP helpers (SSE parsing that checks the framing).
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "parallm/server/http_server.h"
#include "server/fake_engine.h"
#include "test_util.h"

namespace parallm::testing {

using nlohmann::json;

// A fresh temp directory (mkdtemp: see TempDir) holding the test tokenizer and, unless
// chat_template is empty, a tokenizer_config.json with that template.
class TempModelDir {
 public:
  explicit TempModelDir(const std::string& chat_template) : dir_("parallm_srv") {
    write_test_model(dir_.path(), chat_template);
  }
  std::string str() const { return dir_.path(); }

 private:
  TempDir dir_;
};

struct ServerRig {
  TempModelDir dir;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<FakeEngine> engine;
  std::unique_ptr<server::HttpServer> http;
  int port = 0;

  explicit ServerRig(server::ServerOptions opts = {}, std::string chat_template = kChatmlTemplate,
                     int64_t max_model_len = 256)
      : dir(chat_template) {
    tok = load_tokenizer(dir.str());
    engine = std::make_unique<FakeEngine>(tok->encode(kReplyText, false), tok->vocab_size(),
                                          max_model_len);
    opts.model_dir = dir.str();
    http = std::make_unique<server::HttpServer>(*engine, *tok, opts);
    port = http->listen("127.0.0.1", 0);
  }
  ~ServerRig() {
    http->stop();
    engine->shutdown();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(10, 0);
    return c;
  }
  // The reply's text for its first n tokens as the server shows it: decoded after a prompt
  // that ends in an ordinary token, so the first word keeps its leading space.
  std::string reply_text(size_t n) const {
    std::vector<int32_t> ids = tok->encode("a", false);
    const size_t prefix = tok->decode(ids).size();
    ids.insert(ids.end(), engine->reply().begin(),
               engine->reply().begin() + static_cast<long>(std::min(n, engine->reply().size())));
    return tok->decode(ids).substr(prefix);
  }
};

// Splits an SSE body into its `data:` payloads, failing the test unless every event is exactly
// "data: <payload>\n\n", every payload but the last is compact JSON (re-serialising it gives the
// same bytes), and the last is [DONE].
inline std::vector<json> parse_sse(const std::string& body) {
  std::vector<json> out;
  size_t pos = 0;
  bool done = false;
  while (pos < body.size()) {
    EXPECT_FALSE(done) << "data after [DONE]";
    EXPECT_EQ(body.compare(pos, 6, "data: "), 0)
        << "event at " << pos << " does not start with 'data: '";
    const size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) {
      ADD_FAILURE() << "unterminated event at " << pos;
      break;
    }
    const std::string payload = body.substr(pos + 6, end - pos - 6);
    EXPECT_EQ(payload.find('\n'), std::string::npos);
    if (payload == "[DONE]") {
      done = true;
    } else {
      json j = json::parse(payload);
      EXPECT_EQ(j.dump(-1, ' ', false, json::error_handler_t::replace), payload);
      out.push_back(j);
    }
    pos = end + 2;
  }
  EXPECT_TRUE(done) << "no data: [DONE] at the end";
  return out;
}

// Checks OpenAI's error shape and returns the error object.
inline json expect_error(const httplib::Result& r, int status, const std::string& param = "") {
  EXPECT_TRUE(r) << "no response";
  if (!r) return json();
  EXPECT_EQ(r->status, status) << r->body;
  json j;
  try {
    j = json::parse(r->body);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "error body is not JSON: " << r->body;
    return json();
  }
  EXPECT_TRUE(j.contains("error")) << r->body;
  const json& e = j["error"];
  for (const char* k : {"message", "type", "param", "code"})
    EXPECT_TRUE(e.contains(k)) << k << " in " << r->body;
  EXPECT_TRUE(e["message"].is_string());
  EXPECT_FALSE(e["message"].get<std::string>().empty());
  if (!param.empty()) {
    EXPECT_EQ(e["param"], param) << r->body;
  }
  return e;
}

}  // namespace parallm::testing
