// parallm generate: one prompt in, tokens out, on one rank or a tensor-parallel group.
#include <cstdio>
#include <iostream>
#include <memory>

#include "parallm/cli/command.h"
#include "parallm/cli/engine_flags.h"
#include "parallm/core/error.h"
#include "parallm/engine/generate.h"
#include "parallm/model/tokenizer.h"

namespace parallm::cli {
namespace {

struct Options {
  EngineOptions engine;
  std::string prompt, prompt_ids, tokenizer;
  int64_t max_tokens = 64;
  float temperature = 0.0f, top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  bool print_ids = false, ignore_eos = false, print_logits = false, quiet = false;
};

int run(const Options& o) {
  if (o.prompt.empty() == o.prompt_ids.empty())
    fail("cli", "give exactly one of --prompt TEXT or --prompt-ids 1,2,3");
  SamplingParams sp{o.temperature, o.top_k, o.top_p, o.seed};
  validate_sampling(sp);
  std::unique_ptr<Tokenizer> tok;
  if (!o.tokenizer.empty()) tok = load_tokenizer_file(o.tokenizer);
  else tok = load_tokenizer(o.engine.model);
  std::vector<int32_t> prompt;
  if (!o.prompt_ids.empty()) {
    for (int64_t v : parse_int_list(o.prompt_ids, "--prompt-ids")) prompt.push_back(static_cast<int32_t>(v));
  } else {
    if (!tok)
      fail("cli", "--prompt needs a tokenizer, and none was found beside ", o.engine.model,
           " (tokenizer.model or tokenizer.json); give --tokenizer FILE or --prompt-ids");
    prompt = tok->encode(o.prompt, true);
  }
  GenerateOptions go;
  go.max_tokens = o.max_tokens;
  go.ignore_eos = o.ignore_eos;
  go.sampling = sp;
  go.collect_logits = o.print_logits;
  const bool ids_out = o.print_ids || !tok;
  run_model(o.engine, [&](RankContext& ctx) {
    for (int32_t id : prompt)
      if (id < 0 || id >= ctx.config.vocab_size)
        fail("cli", "prompt token id ", id, " is outside the model's vocabulary [0, ",
             ctx.config.vocab_size, ")");
    const bool root = ctx.is_root();
    int32_t prev = prompt.back();
    auto on_token = [&](int32_t id) {
      if (!root || o.quiet) return;
      if (ids_out) std::printf("%d ", id);
      else std::printf("%s", tok->decode_token(prev, id).c_str());
      prev = id;
      std::fflush(stdout);
    };
    if (root && !o.quiet && !ids_out) std::printf("%s", o.prompt.c_str());
    GenerateResult r = generate(ctx.model, ctx.tp, prompt, go, on_token);
    if (!root) return;
    if (!o.quiet) std::printf("\n");
    if (o.print_logits) {
      for (size_t s = 0; s < r.logits.size(); ++s) {
        std::printf("logits[%zu]:", s);
        for (float v : r.logits[s]) std::printf(" %.6g", v);
        std::printf("\n");
      }
    }
    const size_t n = r.tokens.size();
    std::fprintf(stderr, "[generate] tp %d: prompt %zu tokens in %.1f ms (%.1f tok/s); %zu tokens, decode %.2f tok/s%s\n",
                 ctx.tp.size(), prompt.size(), r.prefill_seconds * 1e3,
                 prompt.size() / std::max(r.prefill_seconds, 1e-9), n,
                 n > 1 ? (n - 1) / std::max(r.decode_seconds, 1e-9) : 0.0,
                 r.stopped_at_eos ? " (stopped at EOS)" : "");
  });
  return 0;
}

[[maybe_unused]] const bool registered = register_command(
    {"generate", "Generate text from a prompt (greedy by default)", [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       add_engine_flags(app, o->engine);
       app.add_option("--prompt", o->prompt, "Prompt text (needs a tokenizer beside the model)");
       app.add_option("--prompt-ids", o->prompt_ids, "Prompt as token ids: 1,2,3");
       app.add_option("--tokenizer", o->tokenizer, "tokenizer.model or tokenizer.json (default: beside the model)");
       app.add_option("--max-tokens", o->max_tokens, "Tokens to generate (default 64)")->check(CLI::NonNegativeNumber);
       app.add_option("--temperature", o->temperature, "0 = greedy (default)")->check(CLI::NonNegativeNumber);
       app.add_option("--top-k", o->top_k, "Keep the k most likely tokens (0 = off)")->check(CLI::NonNegativeNumber);
       app.add_option("--top-p", o->top_p, "Nucleus sampling mass in (0, 1] (1 = off)");
       app.add_option("--seed", o->seed, "Sampling seed (default 0)");
       app.add_flag("--print-ids", o->print_ids, "Print token ids instead of text");
       app.add_flag("--ignore-eos", o->ignore_eos, "Do not stop at the end-of-sequence token");
       app.add_flag("--print-logits", o->print_logits, "Print the full logits of every step (gathered)");
       app.add_flag("--quiet", o->quiet, "Print no tokens (timing only)");
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
