// The HTTP server against a fake engine, over raw HTTP on loopback: responses, SSE framing,
// stop strings, usage, logprobs, errors, cancellation on disconnect, metrics, health.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "server/server_test_util.h"

namespace parallm::testing {
namespace {

using namespace std::chrono_literals;

httplib::Result post(const ServerRig& rig, const std::string& path, const json& body) {
  return rig.client().Post(path.c_str(), body.dump(), "application/json");
}

json post_ok(const ServerRig& rig, const std::string& path, const json& body) {
  auto r = post(rig, path, body);
  EXPECT_TRUE(r);
  if (!r) return json();
  EXPECT_EQ(r->status, 200) << r->body;
  return json::parse(r->body);
}

std::string concat_text(const std::vector<json>& chunks, bool chat) {
  std::string s;
  for (const json& c : chunks) {
    for (const json& ch : c["choices"]) {
      if (chat) {
        if (ch["delta"].contains("content")) s += ch["delta"]["content"].get<std::string>();
      } else {
        s += ch["text"].get<std::string>();
      }
    }
  }
  return s;
}

TEST(Server, CompletionTextUsageAndFinishReasons) {
  ServerRig rig;
  const json a =
      post_ok(rig, "/v1/completions",
              {{"model", "fake-model"}, {"prompt", "Once upon a time"}, {"max_tokens", 7}});
  EXPECT_EQ(a["object"], "text_completion");
  EXPECT_EQ(a["model"], "fake-model");
  ASSERT_EQ(a["choices"].size(), 1u);
  EXPECT_EQ(a["choices"][0]["text"], rig.reply_text(7));
  EXPECT_EQ(a["choices"][0]["finish_reason"], "length");
  const auto prompt_ids = rig.tok->encode("Once upon a time", true);
  EXPECT_EQ(rig.engine->last_prompt(), prompt_ids);  // BOS added for a string prompt
  EXPECT_EQ(prompt_ids.front(), rig.tok->bos_id());
  EXPECT_EQ(a["usage"]["prompt_tokens"], prompt_ids.size());
  EXPECT_EQ(a["usage"]["completion_tokens"], 7);
  EXPECT_EQ(a["usage"]["total_tokens"], prompt_ids.size() + 7);

  // Past the reply the fake engine sends EOS: finish_reason stop, the whole reply.
  const json b = post_ok(rig, "/v1/completions", {{"prompt", "x"}, {"max_tokens", 200}});
  EXPECT_EQ(b["choices"][0]["text"], rig.reply_text(1000));
  EXPECT_EQ(b["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(b["usage"]["completion_tokens"], rig.engine->reply().size());

  // Token ids are used exactly as given (no BOS), and parameters reach the engine.
  const json c = post_ok(rig, "/v1/completions",
                         {{"prompt", {7, 8, 9}},
                          {"max_tokens", 3},
                          {"temperature", 0},
                          {"top_p", 0.5},
                          {"top_k", 4},
                          {"seed", 42}});
  EXPECT_EQ(rig.engine->last_prompt(), (std::vector<int32_t>{7, 8, 9}));
  EXPECT_EQ(rig.engine->last_params().temperature, 0.0f);
  EXPECT_EQ(rig.engine->last_params().top_p, 0.5f);
  EXPECT_EQ(rig.engine->last_params().top_k, 4);
  EXPECT_EQ(rig.engine->last_params().seed, 42u);
  EXPECT_EQ(rig.engine->last_params().max_tokens, 3);
  EXPECT_EQ(rig.engine->last_params().top_logprobs, -1);
  EXPECT_EQ(c["usage"]["prompt_tokens"], 3);
  // Without a seed each request gets its own.
  post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1}});
  const uint64_t s1 = rig.engine->last_params().seed;
  post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1}});
  EXPECT_NE(rig.engine->last_params().seed, s1);

  // max_completion_tokens is max_tokens' other name; echo puts the prompt in front.
  const json d = post_ok(rig, "/v1/completions",
                         {{"prompt", "Hello"}, {"max_completion_tokens", 4}, {"echo", true}});
  EXPECT_EQ(d["choices"][0]["text"], "Hello" + rig.reply_text(4));
  EXPECT_EQ(d["usage"]["completion_tokens"], 4);
}

TEST(Server, StreamingFramingDeltasAndUsage) {
  ServerRig rig;
  for (const bool chat : {false, true}) {
    json req = {
        {"max_tokens", 20}, {"stream", true}, {"stream_options", {{"include_usage", true}}}};
    if (chat) {
      req["messages"] = {{{"role", "user"}, {"content", "Tell me a story"}}};
    } else {
      req["prompt"] = "Once";
    }
    const std::string path = chat ? "/v1/chat/completions" : "/v1/completions";
    auto r = post(rig, path, req);
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200);
    EXPECT_EQ(r->get_header_value("Content-Type"), "text/event-stream");
    const auto chunks = parse_sse(r->body);
    ASSERT_GE(chunks.size(), 3u);
    if (chat) {
      EXPECT_EQ(chunks[0]["choices"][0]["delta"]["role"], "assistant");
      for (size_t i = 1; i < chunks.size(); ++i)
        EXPECT_FALSE(chunks[i]["choices"].size() &&
                     chunks[i]["choices"][0]["delta"].contains("role"));
    }
    for (const json& c : chunks) {
      EXPECT_EQ(c["object"], chat ? "chat.completion.chunk" : "text_completion");
      EXPECT_EQ(c["id"], chunks[0]["id"]);
    }
    // The usage chunk closes the stream, with no choices; the chunk before it finishes.
    const json& last = chunks.back();
    EXPECT_TRUE(last["choices"].empty());
    const json& fin = chunks[chunks.size() - 2];
    EXPECT_EQ(fin["choices"][0]["finish_reason"], "length");
    for (size_t i = 0; i + 2 < chunks.size(); ++i)
      EXPECT_TRUE(chunks[i]["choices"][0]["finish_reason"].is_null());

    req.erase("stream");
    req.erase("stream_options");
    const json whole = post_ok(rig, path, req);
    const std::string text = chat ? whole["choices"][0]["message"]["content"].get<std::string>()
                                  : whole["choices"][0]["text"].get<std::string>();
    EXPECT_EQ(concat_text(chunks, chat), text);
    EXPECT_EQ(text, rig.reply_text(20));
    EXPECT_EQ(last["usage"], whole["usage"]);
    EXPECT_EQ(last["usage"]["completion_tokens"], 20);
  }
  // Without include_usage: no usage chunk, the finish chunk is the last before [DONE].
  auto r = post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 3}, {"stream", true}});
  ASSERT_TRUE(r);
  const auto chunks = parse_sse(r->body);
  ASSERT_FALSE(chunks.empty());
  EXPECT_EQ(chunks.back()["choices"][0]["finish_reason"], "length");
  for (const json& c : chunks) EXPECT_FALSE(c.contains("usage"));
  // The exact bytes of a stream's end.
  EXPECT_EQ(r->body.substr(r->body.size() - 14), "data: [DONE]\n\n");
}

// A UTF-8 character split over byte tokens is never cut inside a delta.
TEST(Server, StreamingDeltasAreWholeCharacters) {
  ServerRig rig;
  auto r = post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 200}, {"stream", true}});
  ASSERT_TRUE(r);
  const auto chunks = parse_sse(r->body);  // parse_sse fails on re-serialisation of bad UTF-8
  std::string all;
  for (const json& c : chunks)
    if (!c["choices"].empty()) all += c["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(all, rig.reply_text(1000));
  EXPECT_NE(all.find("caf\xC3\xA9 \xF0\x9F\x99\x82"), std::string::npos);
}

TEST(Server, StopStringsAcrossTokens) {
  ServerRig rig;
  const std::string full = rig.reply_text(1000);
  // "ot na" straddles the pieces " robot" and " named"; "\xF0\x9F\x99\x82" spans four byte tokens.
  for (const std::string& stop :
       {std::string("ot na"), std::string("\xF0\x9F\x99\x82"), std::string("Bo.")}) {
    const size_t at = full.find(stop);
    ASSERT_NE(at, std::string::npos);
    const std::string want = full.substr(0, at);
    // The tokens the engine produced up to the one that completes the stop string.
    size_t n = 1;
    while (rig.reply_text(n).size() < at + stop.size()) ++n;
    const int before = rig.engine->cancelled.load();
    const json a = post_ok(rig, "/v1/completions",
                           {{"prompt", "a"}, {"max_tokens", 200}, {"stop", {"zzz", stop}}});
    EXPECT_EQ(a["choices"][0]["text"], want) << stop;
    EXPECT_EQ(a["choices"][0]["finish_reason"], "stop");
    EXPECT_EQ(a["usage"]["completion_tokens"], n) << stop;
    EXPECT_EQ(rig.engine->cancelled.load(), before + 1) << "the engine request was not cancelled";

    auto r = post(rig, "/v1/chat/completions",
                  {{"messages", {{{"role", "user"}, {"content", "hi"}}}},
                   {"max_tokens", 200},
                   {"stop", stop},
                   {"stream", true}});
    ASSERT_TRUE(r);
    const auto chunks = parse_sse(r->body);
    EXPECT_EQ(concat_text(chunks, true), want) << stop;
    EXPECT_EQ(chunks.back()["choices"][0]["finish_reason"], "stop");
  }
  // A stop string never reached: the whole text, held-back tails included.
  const json b =
      post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 200}, {"stop", "end.!"}});
  EXPECT_EQ(b["choices"][0]["text"], full);
}

TEST(Server, ChatUsesTheTemplate) {
  ServerRig rig;
  const json a = post_ok(
      rig, "/v1/chat/completions",
      {{"messages",
        {{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "Hello"}}}},
       {"max_tokens", 5}});
  EXPECT_EQ(a["object"], "chat.completion");
  EXPECT_EQ(a["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(a["choices"][0]["message"]["content"], rig.reply_text(5));
  const std::string rendered =
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
      "<|im_start|>assistant\n";
  EXPECT_EQ(rig.engine->last_prompt(), rig.tok->encode(rendered, false));
  EXPECT_EQ(rig.engine->last_prompt().front(), 3);  // <|im_start|> as its special id
  EXPECT_EQ(a["usage"]["prompt_tokens"], rig.engine->last_prompt().size());
  // /tokenize renders the same way.
  const json t = post_ok(rig, "/tokenize",
                         {{"messages",
                           {{{"role", "system"}, {"content", "Be brief."}},
                            {{"role", "user"}, {"content", "Hello"}}}}});
  EXPECT_EQ(t["tokens"].get<std::vector<int32_t>>(), rig.engine->last_prompt());
  // Content parts join with newlines; chat's default max_tokens is what the context leaves.
  post_ok(
      rig, "/v1/chat/completions",
      {{"messages",
        {{{"role", "user"},
          {"content", {{{"type", "text"}, {"text", "a"}}, {{"type", "text"}, {"text", "b"}}}}}}}});
  EXPECT_EQ(rig.engine->last_prompt(),
            rig.tok->encode("<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n", false));
  EXPECT_EQ(rig.engine->last_params().max_tokens,
            256 - static_cast<int64_t>(rig.engine->last_prompt().size()));
}

TEST(Server, Logprobs) {
  ServerRig rig;
  const json a =
      post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 6}, {"logprobs", 2}});
  EXPECT_EQ(rig.engine->last_params().top_logprobs, 2);
  const json& lp = a["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 6u);
  ASSERT_EQ(lp["token_logprobs"].size(), 6u);
  ASSERT_EQ(lp["top_logprobs"].size(), 6u);
  ASSERT_EQ(lp["text_offset"].size(), 6u);
  std::string joined;
  for (const json& t : lp["tokens"]) joined += t.get<std::string>();
  EXPECT_EQ(joined, a["choices"][0]["text"]);
  EXPECT_FLOAT_EQ(lp["token_logprobs"][0].get<float>(), -0.25f);
  EXPECT_FLOAT_EQ(lp["token_logprobs"][1].get<float>(), -0.5f);
  EXPECT_EQ(lp["top_logprobs"][0].size(), 2u);

  const json c = post_ok(rig, "/v1/chat/completions",
                         {{"messages", {{{"role", "user"}, {"content", "x"}}}},
                          {"max_tokens", 3},
                          {"logprobs", true},
                          {"top_logprobs", 3}});
  const json& content = c["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 3u);
  EXPECT_EQ(content[0]["top_logprobs"].size(), 3u);
  EXPECT_TRUE(content[0]["bytes"].is_array());
  EXPECT_FLOAT_EQ(content[2]["logprob"].get<float>(), -0.75f);
  // Streamed: one logprobs entry per chunk, in order.
  auto r = post(rig, "/v1/chat/completions",
                {{"messages", {{{"role", "user"}, {"content", "x"}}}},
                 {"max_tokens", 3},
                 {"logprobs", true},
                 {"stream", true}});
  ASSERT_TRUE(r);
  int entries = 0;
  for (const json& ch : parse_sse(r->body)) {
    if (!ch["choices"].empty() && ch["choices"][0]["logprobs"].is_object())
      entries += static_cast<int>(ch["choices"][0]["logprobs"]["content"].size());
  }
  EXPECT_EQ(entries, 3);
  // Without logprobs (or with false) the field is null.
  const json d =
      post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 2}, {"logprobs", false}});
  EXPECT_TRUE(d["choices"][0]["logprobs"].is_null());
}

TEST(Server, ErrorsHaveStatusAndShape) {
  ServerRig rig;
  auto c = rig.client();
  expect_error(c.Post("/v1/completions", "{not json", "application/json"), 400);
  expect_error(c.Post("/v1/completions", "[1,2]", "application/json"), 400);
  expect_error(post(rig, "/v1/completions", {{"max_tokens", 3}}), 400, "prompt");
  expect_error(post(rig, "/v1/completions", {{"prompt", 5}}), 400, "prompt");
  expect_error(post(rig, "/v1/completions", {{"prompt", {1, 99999}}}), 400, "prompt");
  expect_error(post(rig, "/v1/completions", {{"prompt", json::array()}}), 400, "prompt");
  expect_error(post(rig, "/v1/chat/completions", {{"max_tokens", 3}}), 400, "messages");
  expect_error(
      post(rig, "/v1/chat/completions", {{"messages", {{{"role", "wizard"}, {"content", "x"}}}}}),
      400, "messages");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"temperature", 3}}), 400,
               "temperature");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"temperature", "hot"}}), 400,
               "temperature");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"top_p", 0}}), 400, "top_p");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"top_k", -5}}), 400, "top_k");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 0}}), 400,
               "max_tokens");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1.5}}), 400,
               "max_tokens");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"n", 2}}), 400, "n");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"logprobs", 21}}), 400, "logprobs");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"logprobs", true}}), 400,
               "logprobs");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"stop", {1}}}), 400, "stop");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"stream", "yes"}}), 400, "stream");
  expect_error(post(rig, "/v1/completions",
                    {{"prompt", "a"}, {"stream_options", {{"include_usage", true}}}}),
               400, "stream_options");
  expect_error(post(rig, "/v1/chat/completions",
                    {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"top_logprobs", 2}}),
               400, "top_logprobs");
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"presence_penalty", 1}}), 400,
               "presence_penalty");
  // Over the context: 400 naming max_tokens, never a truncated answer.
  const json e =
      expect_error(post(rig, "/v1/completions", {{"prompt", {5, 6, 7}}, {"max_tokens", 254}}), 400,
                   "max_tokens");
  EXPECT_EQ(e["code"], "context_length_exceeded");
  EXPECT_NE(e["message"].get<std::string>().find("257"), std::string::npos) << e;
  post_ok(rig, "/v1/completions", {{"prompt", {5, 6, 7}}, {"max_tokens", 253}});
  expect_error(
      post(rig, "/v1/completions", {{"prompt", std::vector<int>(256, 5)}, {"max_tokens", 1}}), 400,
      "prompt");
  // Unknown model and route: 404; wrong method: 405 with Allow.
  EXPECT_EQ(expect_error(post(rig, "/v1/completions", {{"model", "gpt-4"}, {"prompt", "a"}}), 404,
                         "model")["code"],
            "model_not_found");
  expect_error(c.Get("/v1/nothing"), 404);
  expect_error(c.Post("/v2/completions", "{}", "application/json"), 404);
  auto m = c.Get("/v1/completions");
  expect_error(m, 405);
  EXPECT_EQ(m->get_header_value("Allow"), "POST");
  expect_error(c.Delete("/v1/models"), 405);
  expect_error(c.Post("/health", "{}", "application/json"), 405);
  // The engine's queue is full: 429.
  rig.engine->queue_full = true;
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}}), 429);
  rig.engine->queue_full = false;
  // /detokenize and /tokenize validate too.
  expect_error(post(rig, "/detokenize", {{"tokens", {1, -3}}}), 400, "tokens");
  expect_error(post(rig, "/tokenize", json::object()), 400, "prompt");
}

TEST(Server, ServerSideQueueLimit) {
  server::ServerOptions o;
  o.max_pending = 1;
  ServerRig rig(o);
  rig.engine->step_us = 20000;
  std::thread t([&] { post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 10}}); });
  for (int i = 0; i < 200 && rig.engine->running() == 0; ++i) std::this_thread::sleep_for(5ms);
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1}}), 429);
  t.join();
  post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1}});
}

TEST(Server, ApiKey) {
  server::ServerOptions o;
  o.api_key = "sekret";
  ServerRig rig(o);
  auto c = rig.client();
  expect_error(c.Post("/v1/completions", json({{"prompt", "a"}}).dump(), "application/json"), 401);
  expect_error(c.Get("/v1/models"), 401);
  c.set_bearer_token_auth("wrong");
  expect_error(c.Get("/v1/models"), 401);
  c.set_bearer_token_auth("sekret");
  auto ok = c.Get("/v1/models");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
  auto health = rig.client().Get("/health");  // health and metrics stay open
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

// A second server on a port in use is refused, not bound beside the first (httplib's default
// socket options include SO_REUSEPORT, with which the kernel would share the port between them).
TEST(Server, PortInUseIsRefused) {
  ServerRig rig;
  server::HttpServer second(*rig.engine, *rig.tok, server::ServerOptions{});
  try {
    second.listen("127.0.0.1", rig.port);
    FAIL() << "a second server listened on port " << rig.port;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot listen on 127.0.0.1:" + std::to_string(rig.port)),
              std::string::npos)
        << e.what();
  }
}

// A tokenizer that reads "<s>" and "</s>" in text as plain characters, as sentencepiece's
// tokenizer.model does: those spellings become their byte tokens, the rest is encoded as usual.
class TextSpecialsTokenizer : public Tokenizer {
 public:
  explicit TextSpecialsTokenizer(const Tokenizer& t) : t_(t) {}
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> out;
    if (add_bos) out.push_back(t_.bos_id());
    std::string s(text);
    size_t pos = 0;
    while (pos < s.size()) {
      size_t a = std::min(s.find("<s>", pos), s.find("</s>", pos));
      auto seg =
          t_.encode(s.substr(pos, a == std::string::npos ? std::string::npos : a - pos), false);
      out.insert(out.end(), seg.begin(), seg.end());
      if (a == std::string::npos) break;
      const size_t len = s.compare(a, 3, "<s>") == 0 ? 3 : 4;
      for (size_t i = a; i < a + len; ++i) out.push_back(t_.piece_to_id(cat_byte(s[i])));
      pos = a + len;
    }
    return out;
  }
  std::string decode(const std::vector<int32_t>& ids) const override { return t_.decode(ids); }
  std::string decode_token(int32_t prev, int32_t id) const override {
    return t_.decode_token(prev, id);
  }
  int32_t vocab_size() const override { return t_.vocab_size(); }
  int32_t bos_id() const override { return t_.bos_id(); }
  int32_t eos_id() const override { return t_.eos_id(); }
  std::string id_to_piece(int32_t id) const override { return t_.id_to_piece(id); }

 private:
  static std::string cat_byte(char c) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", static_cast<unsigned char>(c));
    return name;
  }
  const Tokenizer& t_;
};

TEST(Server, ChatBosEosIdsWhenTheTokenizerReadsThemAsText) {
  TempModelDir dir("");
  auto inner = load_tokenizer(dir.str());
  TextSpecialsTokenizer tok(*inner);
  ASSERT_NE(tok.encode("<s>", false), std::vector<int32_t>{1});
  FakeEngine engine(inner->encode(kReplyText, false), tok.vocab_size(), 256);
  server::ServerOptions o;
  o.chat_template = "llama-2";
  o.model_dir = dir.str();
  server::HttpServer http(engine, tok, o);
  const int port = http.listen("127.0.0.1", 0);
  httplib::Client c("127.0.0.1", port);
  json body = {{"messages",
                {{{"role", "user"}, {"content", "hi"}},
                 {{"role", "assistant"}, {"content", "yo"}},
                 {{"role", "user"}, {"content", "and?"}}}},
               {"max_tokens", 2}};
  auto r = c.Post("/v1/chat/completions", body.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  std::vector<int32_t> want = {1};
  auto add = [&](const std::string& text) {
    auto ids = tok.encode(text, false);
    want.insert(want.end(), ids.begin(), ids.end());
  };
  add("[INST] hi [/INST] yo ");
  want.push_back(2);
  want.push_back(1);
  add("[INST] and? [/INST]");
  EXPECT_EQ(engine.last_prompt(), want);
  http.stop();
  engine.shutdown();
}

TEST(Server, NoChatTemplateMeans400) {
  ServerRig rig({}, "");
  EXPECT_FALSE(rig.http->chat_template_problem().empty());
  const json e = expect_error(
      post(rig, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "x"}}}}}),
      400, "messages");
  EXPECT_NE(e["message"].get<std::string>().find("--chat-template"), std::string::npos);
  post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1}});  // completions still work
  // An override by name works without tokenizer_config.json.
  server::ServerOptions o;
  o.chat_template = "llama-2";
  ServerRig rig2(o, "");
  post_ok(rig2, "/v1/chat/completions",
          {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 2}});
  EXPECT_EQ(rig2.engine->last_prompt(), rig2.tok->encode("<s>[INST] hi [/INST]", false));
  expect_error(post(rig2, "/v1/chat/completions",
                    {{"messages", {{{"role", "assistant"}, {"content", "x"}}}}}),
               400, "messages");
  o.chat_template = "vicuna";
  EXPECT_THROW(ServerRig bad(o, ""), std::invalid_argument);
}

TEST(Server, StreamErrorAfterHeaders) {
  ServerRig rig;
  rig.engine->fail_after = 3;
  auto r = post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 10}, {"stream", true}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  const auto chunks = parse_sse(r->body);
  ASSERT_FALSE(chunks.empty());
  ASSERT_TRUE(chunks.back().contains("error")) << r->body;
  EXPECT_EQ(chunks.back()["error"]["type"], "server_error");
  EXPECT_EQ(concat_text({chunks.begin(), chunks.end() - 1}, false), rig.reply_text(3));
  // Not streamed: a 500 in the error shape.
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 10}}), 500);
}

TEST(Server, DisconnectCancelsWithinOneSecond) {
  ServerRig rig;
  rig.engine->step_us = 5000;
  for (const bool chat : {false, true}) {
    const int before = rig.engine->cancelled.load();
    httplib::Request req;
    req.method = "POST";
    req.path = chat ? "/v1/chat/completions" : "/v1/completions";
    json body = {{"max_tokens", 100000 / 1000}, {"ignore_eos", true}, {"stream", true}};
    body["max_tokens"] = 200;
    if (chat)
      body["messages"] = {{{"role", "user"}, {"content", "x"}}};
    else
      body["prompt"] = "a";
    req.body = body.dump();
    req.set_header("Content-Type", "application/json");
    int events = 0;
    req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
      events += static_cast<int>(std::count(d, d + n, '\n'));
      return events < 10;  // hang up after a few events
    };
    auto cli = rig.client();
    cli.send(req);
    const auto t0 = std::chrono::steady_clock::now();
    while (rig.engine->cancelled.load() == before && std::chrono::steady_clock::now() - t0 < 2s)
      std::this_thread::sleep_for(2ms);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(rig.engine->cancelled.load(), before + 1);
    EXPECT_LT(s, 1.0) << "cancel reached the engine after " << s << " s";
    for (int i = 0; i < 100 && rig.engine->running() > 0; ++i) std::this_thread::sleep_for(10ms);
    EXPECT_EQ(rig.engine->running(), 0);
  }
}

// A raw loopback connection that sends one request and can hang up before the answer.
int send_raw(int port, const std::string& path, const json& body) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return -1;
  const std::string b = body.dump();
  const std::string msg = "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                          "Content-Type: application/json\r\nContent-Length: " +
                          std::to_string(b.size()) + "\r\n\r\n" + b;
  if (::send(fd, msg.data(), msg.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(msg.size()))
    return -1;
  return fd;
}

// A non-streamed request writes nothing until its end, so no failed write tells the server that
// its client left: the handler polls the connection's socket and cancels the engine request.
// Also a streamed one still waiting for its first token (nothing written yet either).
TEST(Server, NonStreamedDisconnectCancelsWithinOneSecond) {
  ServerRig rig;
  rig.engine->step_us = 50000;  // 200 tokens: 10 s if nothing cancels them
  for (const bool stream : {false, true}) {
    for (const bool chat : {false, true}) {
      if (stream && chat) continue;
      const int before = rig.engine->cancelled.load();
      json body = {{"max_tokens", 200}, {"ignore_eos", true}, {"stream", stream}};
      if (chat)
        body["messages"] = {{{"role", "user"}, {"content", "x"}}};
      else
        body["prompt"] = "a";
      // Streamed: a token every 1.5 s, so that no write fails within the second measured.
      if (stream) rig.engine->step_us = 1500000;
      const int fd = send_raw(rig.port, chat ? "/v1/chat/completions" : "/v1/completions", body);
      ASSERT_GE(fd, 0);
      for (int i = 0; i < 400 && rig.engine->running() == 0; ++i)
        std::this_thread::sleep_for(5ms);
      ASSERT_EQ(rig.engine->running(), 1);
      std::this_thread::sleep_for(100ms);
      ::close(fd);
      const auto t0 = std::chrono::steady_clock::now();
      while (rig.engine->cancelled.load() == before && std::chrono::steady_clock::now() - t0 < 3s)
        std::this_thread::sleep_for(2ms);
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_EQ(rig.engine->cancelled.load(), before + 1)
          << "stream " << stream << " chat " << chat;
      EXPECT_LT(s, 1.0) << "cancel reached the engine after " << s << " s (stream " << stream
                        << ", chat " << chat << ")";
      rig.engine->step_us = 50000;
      for (int i = 0; i < 300 && rig.engine->running() > 0; ++i) std::this_thread::sleep_for(10ms);
      EXPECT_EQ(rig.engine->running(), 0);
    }
  }
  // A client that stays gets its whole answer (the probe does not mistake it for gone).
  auto r = post(rig, "/v1/completions",
                {{"prompt", "a"}, {"max_tokens", 20}, {"ignore_eos", true}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(json::parse(r->body)["usage"]["completion_tokens"], 20);
}

TEST(Server, StopEndsStreamsPromptly) {
  ServerRig rig;
  rig.engine->step_us = 20000;
  std::string body;
  std::thread t([&] {
    auto r = post(rig, "/v1/completions",
                  {{"prompt", "a"}, {"max_tokens", 200}, {"ignore_eos", true}, {"stream", true}});
    if (r) body = r->body;
  });
  for (int i = 0; i < 200 && rig.engine->running() == 0; ++i) std::this_thread::sleep_for(5ms);
  std::this_thread::sleep_for(60ms);
  const auto t0 = std::chrono::steady_clock::now();
  rig.http->stop();
  t.join();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 3.0);
  EXPECT_NE(body.find("\"error\""), std::string::npos) << body;
  // stop() cancels the request; the engine drops a cancelled request at its next step (20 ms
  // here), which may come after stop() has returned.
  EXPECT_EQ(rig.engine->cancelled.load(), 1);
  for (int i = 0; i < 100 && rig.engine->running() > 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(rig.engine->running(), 0);
}

TEST(Server, HealthModelsMetricsTokenize) {
  ServerRig rig;
  rig.engine->ready_flag = false;
  auto c = rig.client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 503);
  expect_error(post(rig, "/v1/completions", {{"prompt", "a"}}), 503);
  rig.engine->ready_flag = true;
  h = c.Get("/health");
  EXPECT_EQ(h->status, 200);

  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  const json models = json::parse(m->body);
  EXPECT_EQ(models["object"], "list");
  ASSERT_EQ(models["data"].size(), 1u);
  EXPECT_EQ(models["data"][0]["id"], "fake-model");
  EXPECT_EQ(models["data"][0]["object"], "model");
  EXPECT_EQ(models["data"][0]["max_model_len"], 256);
  EXPECT_EQ(c.Get("/v1/models/fake-model")->status, 200);
  expect_error(c.Get("/v1/models/other"), 404, "model");

  post_ok(rig, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 5}});
  auto r = c.Get("/metrics");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  // Prometheus text: comments, or `name{labels} value`.
  const std::regex sample(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.eE+-]+|\+Inf|NaN)$)");
  std::istringstream lines(r->body);
  std::string line;
  std::map<std::string, double> values;
  while (std::getline(lines, line)) {
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) continue;
    std::smatch mm;
    ASSERT_TRUE(std::regex_match(line, mm, sample)) << line;
    values[mm[1].str()] += std::stod(mm[3].str());
  }
  for (const char* name :
       {"parallm:num_requests_running", "parallm:num_requests_waiting",
        "parallm:kv_cache_usage_perc", "parallm:prompt_tokens_total",
        "parallm:generation_tokens_total", "parallm:num_preemptions_total",
        "parallm:prefix_cache_queries_total", "parallm:prefix_cache_hits_total",
        "parallm:time_to_first_token_seconds_count", "parallm:inter_token_latency_seconds_count",
        "parallm:e2e_request_latency_seconds_count", "parallm:request_success_total"})
    EXPECT_TRUE(values.count(name)) << name;
  EXPECT_EQ(values["parallm:generation_tokens_total"], 5);
  EXPECT_EQ(values["parallm:time_to_first_token_seconds_count"], 1);
  EXPECT_EQ(values["parallm:inter_token_latency_seconds_count"], 4);
  EXPECT_EQ(values["parallm:e2e_request_latency_seconds_count"], 1);

  const json t = post_ok(rig, "/tokenize", {{"prompt", "hello world"}});
  const auto ids = t["tokens"].get<std::vector<int32_t>>();
  EXPECT_EQ(ids, rig.tok->encode("hello world", true));
  EXPECT_EQ(t["count"], ids.size());
  EXPECT_EQ(post_ok(rig, "/tokenize", {{"prompt", "hi"}, {"add_special_tokens", false}})["tokens"]
                .get<std::vector<int32_t>>(),
            rig.tok->encode("hi", false));
  EXPECT_EQ(post_ok(rig, "/detokenize", {{"tokens", ids}})["prompt"], "hello world");
}

TEST(Server, ConcurrentStreams) {
  ServerRig rig;
  std::vector<std::thread> ts;
  std::atomic<int> good{0};
  for (int i = 0; i < 64; ++i) {
    ts.emplace_back([&, i] {
      auto r = post(rig, "/v1/completions",
                    {{"prompt", "a"}, {"max_tokens", 5 + i % 30}, {"stream", true}});
      ASSERT_TRUE(r) << "request " << i << ": " << httplib::to_string(r.error());
      ASSERT_EQ(r->status, 200) << r->body;
      const auto chunks = parse_sse(r->body);
      EXPECT_EQ(concat_text(chunks, false), rig.reply_text(5 + i % 30));
      if (concat_text(chunks, false) == rig.reply_text(5 + i % 30)) ++good;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(good.load(), 64);
}

}  // namespace
}  // namespace parallm::testing

#include "parallm/server/bench_client.h"

namespace parallm::testing {
namespace {

TEST(BenchServe, CountsTokensAndTimesAgainstTheFakeServer) {
  ServerRig rig;
  server::BenchOptions o;
  o.base_url = "http://127.0.0.1:" + std::to_string(rig.port);
  o.num_prompts = 12;
  o.request_rate = 200;
  o.seed = 3;
  o.max_concurrency = 4;
  o.input_len = 8;
  o.output_len = 6;
  o.range_ratio = 0.5;
  const server::BenchReport rep = server::run_bench_serve(o);
  const json j = rep.to_json();
  EXPECT_EQ(j["completed"], 12);
  EXPECT_EQ(j["failed"], 0);
  int64_t out = 0, in = 0;
  for (const auto& r : rep.requests) {
    EXPECT_TRUE(r.ok) << r.error;
    EXPECT_GE(r.prompt_len, 4);
    EXPECT_LE(r.prompt_len, 12);
    EXPECT_EQ(r.text, rig.reply_text(static_cast<size_t>(r.output_tokens)));
    out += r.output_tokens;
    in += r.prompt_len;
  }
  EXPECT_EQ(j["total_output_tokens"], out);
  EXPECT_EQ(j["total_input_tokens"], in);
  for (const char* k : {"request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                        "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "mean_e2el_ms"}) {
    ASSERT_TRUE(j.contains(k)) << k;
    EXPECT_GT(j[k].get<double>(), 0) << k;
  }
  EXPECT_EQ(rig.engine->last_params().ignore_eos, true);
  // The same seed gives the same requests.
  const server::BenchReport again = server::run_bench_serve(o);
  EXPECT_EQ(again.to_json()["input_lens"], j["input_lens"]);
  EXPECT_EQ(again.to_json()["output_lens"], j["output_lens"]);
  EXPECT_NE(rep.summary().find("Successful requests:"), std::string::npos);
  // An unreachable server is one clear error.
  o.base_url = "http://127.0.0.1:1";
  EXPECT_THROW(server::run_bench_serve(o), std::runtime_error);
}

}  // namespace
}  // namespace parallm::testing

#include "test_util.h"

namespace parallm::testing {
namespace {

// The CLI end to end: `parallm bench serve` against the fake server writes vLLM's JSON; its
// mistakes are one line.
TEST(BenchServe, CommandLine) {
  ServerRig rig;
  const std::string out = ::testing::TempDir() + "bench_serve_result.json";
  auto r = run_parallm("bench serve --port " + std::to_string(rig.port) +
                       " --num-prompts 5 --random-input-len 4 --random-output-len 3 --seed 7"
                       " --result-file " +
                       out);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("Successful requests:                     5"), std::string::npos)
      << r.output;
  std::ifstream in(out);
  const json j = json::parse(in);
  EXPECT_EQ(j["completed"], 5);
  EXPECT_EQ(j["total_output_tokens"], 15);
  EXPECT_EQ(j["request_rate"], "inf");
  for (const auto& [args, needle] : std::vector<std::pair<std::string, std::string>>{
           {"--port 1", "cannot reach the server"},
           {"--port 1 --request-rate 0", "--request-rate 0"},
           {"--port 1 --num-prompts 0", "--num-prompts"},
           {"--port 1 --random-range-ratio 1", "--random-range-ratio"}}) {
    auto e = run_parallm("bench serve " + args);
    EXPECT_EQ(e.exit_code, 1) << args << "\n" << e.output;
    EXPECT_NE(e.output.find(needle), std::string::npos) << args << "\n" << e.output;
    EXPECT_EQ(std::count(e.output.begin(), e.output.end(), '\n'), 1) << e.output;
  }
  std::remove(out.c_str());
}

}  // namespace
}  // namespace parallm::testing
