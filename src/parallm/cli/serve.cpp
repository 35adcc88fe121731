// parallm serve: the OpenAI-compatible server (docs/serving.md). The engine (engine/serve_engine.h:
// continuous batching, the paged KV cache, TP x PP ranks, DP replicas) runs as threads of this
// process, or under mpirun as one process per rank: world rank 0's process serves HTTP and runs
// the scheduler, the others follow its step plans until it shuts down.
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>

#include "parallm/cli/command.h"
#include "parallm/cli/engine_flags.h"
#include "parallm/core/error.h"
#include "parallm/engine/serve_engine.h"
#include "parallm/model/tokenizer.h"
#include "parallm/server/http_server.h"

namespace parallm::cli {
namespace {

struct ServeOptions {
  serve::ServeConfig engine;
  server::ServerOptions http;
  std::string tokenizer;  // a file instead of the one beside the model
  std::string kv_cache_memory;  // --kv-cache-memory as given (parse_kv_cache_memory)
  std::string host = "127.0.0.1";
  int port = 8000;
};

int run_serve(ServeOptions o) {
  if (o.port < 0 || o.port > 65535) fail("serve", "--port ", o.port, " is not in [0, 65535]");
  if (!o.kv_cache_memory.empty()) serve::parse_kv_cache_memory(o.kv_cache_memory, o.engine);
  if (!serve::serve_process_is_root()) {  // under mpirun: a rank that follows rank 0's plans
    // mpirun forwards a SIGTERM/SIGINT to every process: a follower that died of it would leave
    // rank 0's shutdown message unanswered and the job failed. Rank 0 handles the signal and
    // sends its exit message; the follower leaves when that arrives.
    std::signal(SIGTERM, SIG_IGN);
    std::signal(SIGINT, SIG_IGN);
    serve::run_serve_follower(o.engine);
    return 0;
  }
  // The layout first (a bad config, e.g. --enable-expert-parallel on a dense model, is one line
  // naming the flag, whatever the tokenizer), then the tokenizer, both before any rank loads.
  const serve::KvLayout kv = serve::serve_kv_layout(o.engine);
  // A server that cannot tokenize answers nothing.
  std::unique_ptr<Tokenizer> tokenizer =
      o.tokenizer.empty() ? load_tokenizer(o.engine.model) : load_tokenizer_file(o.tokenizer);
  if (!tokenizer)
    fail("serve", "--model ", o.engine.model,
         ": no tokenizer (tokenizer.json or tokenizer.model) beside the model; name one with "
         "--tokenizer");
  o.http.model_dir = o.engine.model;
  if (o.http.served_model_name.empty()) o.http.served_model_name = o.engine.served_model_name;
  std::unique_ptr<serve::ServeEngine> engine = serve::make_serve_engine(o.engine);
  int exit_code = 0;
  {
    server::HttpServer http(*engine, *tokenizer, o.http);
    const int port = http.listen(o.host, o.port);
    std::printf(
        "serve: http://%s:%d  model %s  tp %d x pp %d x dp %d  max-model-len %lld  KV %lld blocks "
        "of %lld positions (%.1f MiB per rank)\n",
        o.host.c_str(), port, engine->info().name.c_str(), o.engine.tp, o.engine.pp, o.engine.dp,
        static_cast<long long>(kv.max_model_len), static_cast<long long>(kv.num_blocks),
        static_cast<long long>(o.engine.block_size),
        static_cast<double>(kv.num_blocks) * static_cast<double>(kv.block_bytes) / (1 << 20));
    if (!http.chat_template_problem().empty())
      std::printf("serve: chat completions are refused: %s\n",
                  http.chat_template_problem().c_str());
    if (o.engine.kv_cache_fraction > 0)
      std::printf("serve: --kv-cache-memory %g of MemAvailable %.1f MiB, split over this "
                  "machine's ranks: %llu bytes per rank -> %lld blocks of %llu bytes\n",
                  o.engine.kv_cache_fraction, static_cast<double>(kv.mem_available) / (1 << 20),
                  static_cast<unsigned long long>(kv.budget_bytes),
                  static_cast<long long>(kv.num_blocks),
                  static_cast<unsigned long long>(kv.block_bytes));
    else if (kv.budget_bytes > 0)
      std::printf("serve: --kv-cache-memory %llu bytes per rank -> %lld blocks of %llu bytes\n",
                  static_cast<unsigned long long>(kv.budget_bytes),
                  static_cast<long long>(kv.num_blocks),
                  static_cast<unsigned long long>(kv.block_bytes));
    std::fflush(stdout);
    const int sig = server::wait_for_signal(http);
    if (sig != 0) std::printf("serve: signal %d, shutting down\n", sig);
  }
  engine->shutdown();
  if (!engine->failure().empty()) {
    std::fprintf(stderr, "[serve] %s\n", engine->failure().c_str());
    exit_code = 1;
  }
  std::fflush(stdout);
  return exit_code;
}

[[maybe_unused]] const bool serve_registered = register_command(
    {"serve", "OpenAI-compatible HTTP server with continuous batching and a paged KV cache",
     [](CLI::App& app) {
       auto o = std::make_shared<ServeOptions>();
       serve::ServeConfig& e = o->engine;
       app.add_option("--model", e.model,
                      "Model: a Hugging Face directory (config.json + safetensors + tokenizer), a "
                      ".safetensors file, a .gguf file, or a llama2.c .bin checkpoint")
           ->required();
       app.add_option("--tokenizer", o->tokenizer,
                      "A tokenizer file (tokenizer.json or *.model) instead of the model's");
       app.add_option("--host", o->host, "Address to listen on (default 127.0.0.1)");
       app.add_option("--port", o->port, "Port (default 8000; 0: any free port, printed)");
       app.add_option("--served-model-name", e.served_model_name,
                      "Model name in the API (default: the model's directory or file name)");
       app.add_option("--tensor-parallel-size,--tp", e.tp, "Tensor-parallel ranks per replica")
           ->check(CLI::PositiveNumber);
       app.add_option("--pipeline-parallel-size,--pp", e.pp, "Pipeline stages per replica")
           ->check(CLI::PositiveNumber);
       app.add_option("--data-parallel-size,--dp", e.dp,
                      "Replicas, each with its own scheduler and KV cache")
           ->check(CLI::PositiveNumber);
       app.add_option("--pp-layers", e.pp_layers, "Layers per stage, e.g. 6,5,5,6 (default: even)")
           ->delimiter(',');
       app.add_flag("--enable-expert-parallel", e.enable_expert_parallel,
                    "Mixture of experts, vLLM's layout: whole experts placed over the --tp ranks "
                    "(E/TP each), attention and LM head TP-split (docs/moe.md)");
       add_runtime_flags(app, e.threads, e.dtype, e.backend, e.comm_timeout_s);
       add_pp_split_flag(app, e.pp_split);
       app.add_option("--max-num-seqs", e.max_num_seqs,
                      "Sequences in the running batch per replica (default 64)")
           ->check(CLI::PositiveNumber);
       app.add_option("--max-num-batched-tokens", e.max_num_batched_tokens,
                      "Tokens per step and micro-batch; longer prompts are fed in chunks "
                      "(default 512)")
           ->check(CLI::PositiveNumber);
       app.add_option("--block-size", e.block_size, "Positions per KV-cache block (default 16)")
           ->check(CLI::PositiveNumber);
       app.add_option("--kv-cache-memory", o->kv_cache_memory,
                      "KV-cache budget per rank: bytes (1073741824, 512MiB, 2GiB) or a fraction "
                      "in (0, 1] of the available memory, split between this machine's ranks "
                      "(0.5) (default: max-num-seqs sequences of max-model-len, at most 4 GiB)");
       app.add_flag("--enable-prefix-caching", e.enable_prefix_caching,
                    "Reuse the KV blocks of identical prompt prefixes");
       app.add_option("--max-model-len", e.max_model_len,
                      "Longest prompt + completion (default: the model's context)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--max-waiting", e.max_waiting,
                      "Waiting requests per replica before new ones get 429 (default 1024)")
           ->check(CLI::PositiveNumber);
       app.add_option("--api-key", o->http.api_key,
                      "Require 'Authorization: Bearer KEY' on /v1/* routes");
       app.add_option("--chat-template", o->http.chat_template,
                      "Chat template family: llama-2, llama-3, chatml, mistral (default: detected "
                      "from tokenizer_config.json)");
       app.add_option("--http-threads", o->http.http_threads,
                      "Connections served at once (a stream holds one; default 256)")
           ->check(CLI::PositiveNumber);
       return [o] { return run_serve(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
