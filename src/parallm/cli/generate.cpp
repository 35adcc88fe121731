// parallm generate: one prompt in, tokens out, on one rank or a tensor-parallel group.
#include "parallm/engine/generate.h"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

#include "parallm/cli/command.h"
#include "parallm/cli/engine_flags.h"
#include "parallm/core/error.h"
#include "parallm/engine/batch_generate.h"
#include "parallm/model/tokenizer.h"
#include "parallm/model/weights.h"

namespace parallm::cli {
namespace {

struct Options {
  EngineOptions engine;
  std::string prompt, prompt_ids, tokenizer, prompts_file;
  int micro_batches = 0;
  int64_t max_tokens = 64;
  float temperature = 0.0f, top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  bool print_ids = false, ignore_eos = false, print_logits = false, quiet = false;
};

bool is_id_list(const std::string& line) {
  return !line.empty() && line.find_first_not_of("0123456789, ") == std::string::npos &&
         line.find_first_of("0123456789") != std::string::npos;
}

// Reads --prompts-file: one prompt per line, text or token ids ("1,2,3"); blank lines skipped.
std::vector<std::vector<int32_t>> read_prompts(const std::string& path, const Tokenizer* tok) {
  std::ifstream in(path);
  if (!in) fail<std::runtime_error>("cli", "--prompts-file ", path, ": cannot open");
  std::vector<std::vector<int32_t>> out;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (is_id_list(line)) {
      std::vector<int32_t> ids;
      for (int64_t v : parse_int_list(line, cat("--prompts-file ", path, " line ", n)))
        ids.push_back(static_cast<int32_t>(v));
      out.push_back(std::move(ids));
    } else {
      if (!tok)
        fail("cli", "--prompts-file ", path, " line ", n,
             " is text, but no tokenizer was found beside the model (give --tokenizer or token "
             "ids)");
      out.push_back(tok->encode(line, true));
    }
  }
  if (out.empty()) fail("cli", "--prompts-file ", path, ": no prompts");
  return out;
}

// Batched and/or pipelined generation: prints each sequence, then the pipeline's summary.
int run_batch(const Options& o, const std::vector<std::vector<int32_t>>& prompts,
              const Tokenizer* tok) {
  BatchOptions bo;
  bo.max_tokens = o.max_tokens;
  bo.ignore_eos = o.ignore_eos;
  bo.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  bo.micro_batches = o.micro_batches;
  bo.collect_logits = o.print_logits;
  const bool ids_out = o.print_ids || !tok;
  run_model(o.engine, [&](RankContext& ctx) {
    BatchResult r = generate_batch(ctx.model, ctx.mesh, prompts, bo);
    // Each rank's (busy, wall, prompt-pass busy, prompt-pass wall), gathered at every rank.
    float mine[4] = {static_cast<float>(r.busy_seconds), static_cast<float>(r.seconds),
                     static_cast<float>(r.prefill_busy_seconds),
                     static_cast<float>(r.prefill_seconds)};
    std::vector<float> all(4 * ctx.world.size());
    ctx.world.all_gather(mine, all.data(), 4, DType::F32);
    size_t total = 0;
    for (const auto& seq : r.sequences) total += seq.tokens.size();
    // One process prints all of stdout: the last stage's first TP rank, which holds the logits and
    // its own record of every token. (Two printers, even ordered by a barrier, can interleave
    // mid-line under mpirun, whose output forwarding merges the processes' pipes in arbitrary
    // chunks.)
    const bool printer = ctx.mesh.last_stage() && ctx.mesh.tp_rank() == 0;
    if (printer) {
      for (size_t i = 0; !o.quiet && i < r.sequences.size(); ++i) {
        std::printf("[%zu] ", i);
        if (ids_out) {
          for (int32_t t : r.sequences[i].tokens) std::printf("%d ", t);
        } else {
          std::printf("%s", tok->decode(r.sequences[i].tokens).c_str());
        }
        std::printf("\n");
      }
      for (size_t i = 0; o.print_logits && i < r.sequences.size(); ++i)
        for (size_t s = 0; s < r.sequences[i].logits.size(); ++s) {
          std::printf("logits[%zu][%zu]:", i, s);
          for (float v : r.sequences[i].logits[s]) std::printf(" %.6g", v);
          std::printf("\n");
        }
      std::fflush(stdout);
    }
    if (!ctx.is_root()) return;
    const int P = ctx.mesh.pp_size(), M = r.micro_batches;
    std::fprintf(stderr,
                 "[generate] tp %d x pp %d, %zu sequences in %d micro-batches: %zu tokens in %.3f "
                 "s (%.1f tok/s)\n",
                 ctx.mesh.tp_size(), P, r.sequences.size(), M, total, r.seconds,
                 total / std::max(r.seconds, 1e-9));
    if (P > 1) {
      double idle_all = 0, idle_prefill = 0;
      for (int s = 0; s < P; ++s) {
        const float* v = &all[4 * ctx.mesh.global_rank(0, 0, s)];
        std::fprintf(stderr,
                     "[pipeline] stage %d: busy %.1f%% of the run, %.1f%% of the prompt pass\n", s,
                     100.0 * v[0] / v[1], 100.0 * v[2] / v[3]);
        idle_all += 1.0 - v[0] / v[1];
        idle_prefill += 1.0 - v[2] / v[3];
      }
      std::fprintf(stderr,
                   "[pipeline] bubble: prompt pass %.3f (GPipe formula (p-1)/(m+p-1) = %.3f), "
                   "whole run %.3f\n",
                   idle_prefill / P, (P - 1.0) / (M + P - 1.0), idle_all / P);
    }
  });
  return 0;
}

int run(const Options& o) {
  const int given = !o.prompt.empty() + !o.prompt_ids.empty() + !o.prompts_file.empty();
  if (given != 1)
    fail("cli", "give exactly one of --prompt TEXT, --prompt-ids 1,2,3 or --prompts-file FILE");
  SamplingParams sp{o.temperature, o.top_k, o.top_p, o.seed};
  validate_sampling(sp);
  std::unique_ptr<Tokenizer> tok;
  if (!o.tokenizer.empty())
    tok = load_tokenizer_file(o.tokenizer);
  else
    tok = load_tokenizer(o.engine.model);
  if (tok) {
    ModelConfig config;
    open_model(o.engine.model, &config);
    if (tok->vocab_size() > config.vocab_size)
      fail("cli", "the tokenizer has ", tok->vocab_size(), " tokens but the model's vocab_size is ",
           config.vocab_size, ": they do not belong together");
  }
  if (!o.prompts_file.empty())
    return run_batch(o, read_prompts(o.prompts_file, tok.get()), tok.get());
  std::vector<int32_t> prompt;
  if (!o.prompt_ids.empty()) {
    for (int64_t v : parse_int_list(o.prompt_ids, "--prompt-ids"))
      prompt.push_back(static_cast<int32_t>(v));
  } else {
    if (!tok)
      fail("cli", "--prompt needs a tokenizer, and none was found beside ", o.engine.model,
           " (tokenizer.model or tokenizer.json); give --tokenizer FILE or --prompt-ids");
    prompt = tok->encode(o.prompt, true);
  }
  if (o.engine.pp > 1 || o.micro_batches > 0) return run_batch(o, {prompt}, tok.get());
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
    // Streams whole characters only: a character split over byte tokens is held back.
    std::unique_ptr<TokenStreamer> stream;
    if (tok) stream = std::make_unique<TokenStreamer>(*tok);
    auto on_token = [&](int32_t id) {
      if (!root || o.quiet) return;
      if (ids_out)
        std::printf("%d ", id);
      else
        std::printf("%s", stream->push(id).c_str());
      std::fflush(stdout);
    };
    if (root && !o.quiet && !ids_out) std::printf("%s", o.prompt.c_str());
    GenerateResult r = generate(ctx.model, ctx.tp, prompt, go, on_token);
    if (!root) return;
    if (!o.quiet && !ids_out) std::printf("%s", stream->finish().c_str());
    if (!o.quiet) std::printf("\n");
    if (o.print_logits) {
      for (size_t s = 0; s < r.logits.size(); ++s) {
        std::printf("logits[%zu]:", s);
        for (float v : r.logits[s]) std::printf(" %.6g", v);
        std::printf("\n");
      }
    }
    const size_t n = r.tokens.size();
    std::fprintf(stderr,
                 "[generate] tp %d: prompt %zu tokens in %.1f ms (%.1f tok/s); %zu tokens, decode "
                 "%.2f tok/s%s\n",
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
       app.add_option("--prompts-file", o->prompts_file,
                      "Generate for every line (text or token ids 1,2,3) together, as one batch");
       app.add_option("--micro-batches", o->micro_batches,
                      "Micro-batches the batch is cut into (default: the number of --pp stages)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--tokenizer", o->tokenizer,
                      "tokenizer.model or tokenizer.json (default: beside the model)");
       app.add_option("--max-tokens", o->max_tokens, "Tokens to generate (default 64)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--temperature", o->temperature, "0 = greedy (default)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--top-k", o->top_k, "Keep the k most likely tokens (0 = off)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--top-p", o->top_p, "Nucleus sampling mass in (0, 1] (1 = off)");
       app.add_option("--seed", o->seed, "Sampling seed (default 0)");
       app.add_flag("--print-ids", o->print_ids, "Print token ids instead of text");
       app.add_flag("--ignore-eos", o->ignore_eos, "Do not stop at the end-of-sequence token");
       app.add_flag("--print-logits", o->print_logits,
                    "Print the full logits of every step (gathered)");
       app.add_flag("--quiet", o->quiet, "Print no tokens (timing only)");
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
