// parallm_fake_server: the HTTP server on a fake engine (tests/server/fake_engine.h), for client
// tests that need a live URL without a model (openai_client_test.sh --fake).
//
//   parallm_fake_server [--port N (0: any)] [--api-key K] [--port-file F]
//                       [--expected-out F --expected-tokens N]
// --port-file gets the bound port once the server accepts; --expected-out gets the text a greedy
// completion of "Once upon a time" with N tokens returns. Runs until SIGINT/SIGTERM.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "parallm/server/http_server.h"
#include "server/fake_engine.h"
#include "temp_dir.h"

int main(int argc, char** argv) {
  using namespace parallm;
  int port = 0, expected_tokens = 16;
  std::string api_key, port_file, expected_out;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--port")
      port = std::atoi(v.c_str());
    else if (k == "--api-key")
      api_key = v;
    else if (k == "--port-file")
      port_file = v;
    else if (k == "--expected-out")
      expected_out = v;
    else if (k == "--expected-tokens")
      expected_tokens = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "parallm_fake_server: unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  const testing::TempDir model_dir("parallm_fake_server");
  const std::string& dir = model_dir.path();
  testing::write_test_model(dir, testing::kChatmlTemplate);
  auto tok = load_tokenizer(dir);
  testing::FakeEngine engine(tok->encode(testing::kReplyText, false), tok->vocab_size(), 512);
  engine.step_us = 2000;
  if (!expected_out.empty()) {
    // What the server shows: the reply decoded as the continuation of the test's prompt.
    std::vector<int32_t> ids = tok->encode("Once upon a time", true);
    const size_t prompt_chars = tok->decode(ids).size();
    ids.insert(ids.end(), engine.reply().begin(), engine.reply().begin() + expected_tokens);
    std::ofstream(expected_out) << tok->decode(ids).substr(prompt_chars);
  }
  server::ServerOptions opts;
  opts.api_key = api_key;
  opts.model_dir = dir;
  int rc = 0;
  {
    server::HttpServer http(engine, *tok, opts);
    const int bound = http.listen("127.0.0.1", port);
    if (!port_file.empty()) std::ofstream(port_file) << bound;
    std::printf("parallm_fake_server: listening on 127.0.0.1:%d\n", bound);
    std::fflush(stdout);
    server::wait_for_signal(http);
  }
  engine.shutdown();
  return rc;
}
