// parallm generate: prompts in, tokens out, through the one generation loop (engine/
// batch_generate.h) on any layout: one prompt (--prompt, --prompt-ids) on one rank or a
// tensor-parallel group, streamed as it is generated; or a batch (--prompts-file) and/or a pipeline
// (--pp), cut into micro-batches, printed at the end with the pipeline's measured bubble.
#include "parallm/engine/generate.h"

#include <sys/stat.h>

#include <charconv>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>

#include "parallm/cli/command.h"
#include "parallm/cli/engine_flags.h"
#include "parallm/comm/stats.h"
#include "parallm/core/error.h"
#include "parallm/engine/batch_generate.h"
#include "parallm/model/tokenizer.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/simulator.h"

namespace parallm::cli {
namespace {

struct Options {
  EngineOptions engine;
  std::string prompt, tokenizer, prompts_file;
  std::vector<int64_t> prompt_ids;
  int micro_batches = 0;
  int64_t max_tokens = 64, prefill_chunk = 0;
  float temperature = 0.0f, top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  bool print_ids = false, ignore_eos = false, print_logits = false, quiet = false;
  bool check_finite = false;
  bool moe_stats = false;
};

// The most --prompts-file may hold: the file is read whole, so its size is bounded before reading.
constexpr int64_t kPromptsFileLimit = int64_t{64} << 20;

// --seed: an integer in [0, 2^64); "" or the reason. Parsed as unsigned without a sign, so "-1"
// is refused instead of wrapping to 2^64-1.
std::string parse_seed(const std::string& text, uint64_t* seed) {
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec == std::errc::invalid_argument || end != text.data() + text.size())
    return cat("--seed must be an integer in [0, 2^64), got \"", text, "\"");
  if (ec == std::errc::result_out_of_range)
    return cat("--seed ", text, " is outside [0, 2^64)");
  *seed = v;
  return "";
}

bool is_id_list(const std::string& line) {
  return !line.empty() && line.find_first_not_of("0123456789, ") == std::string::npos &&
         line.find_first_of("0123456789") != std::string::npos;
}

// One item of a token-id list ("42", spaces around allowed) -> its value; "" when it is not an
// integer that fits a token id (int32), else the reason. The one parse of --prompt-ids (through
// CLI11's list splitting) and of --prompts-file lines.
std::string parse_token_id(std::string item, int32_t* id) {
  const size_t b = item.find_first_not_of(' '), e = item.find_last_not_of(' ');
  item = b == std::string::npos ? "" : item.substr(b, e - b + 1);
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
  if (item.empty() || ec == std::errc::invalid_argument || end != item.data() + item.size())
    return cat("\"", item, "\" is not an integer");
  if (ec == std::errc::result_out_of_range || v < 0 || v > std::numeric_limits<int32_t>::max())
    return cat("token id ", item, " is outside [0, 2^31)");
  *id = static_cast<int32_t>(v);
  return "";
}

// Token ids inside the model's vocabulary; one error line names `what` and the value.
void check_vocab(const std::vector<int32_t>& ids, const std::string& what, int64_t vocab) {
  for (int32_t id : ids)
    if (id >= vocab)
      fail("cli", what, ": token id ", id, " is outside the model's vocabulary [0, ", vocab, ")");
}

// Reads --prompts-file: one prompt per line, text or token ids ("1,2,3"); blank lines skipped.
// Only a regular file of at most kPromptsFileLimit bytes is read (a device or FIFO could be
// endless), and no more than that many bytes even if it grows while read.
std::string read_prompts_text(const std::string& path) {
  struct stat sb {};
  if (::stat(path.c_str(), &sb) != 0)
    fail<std::runtime_error>("cli", "--prompts-file ", path, ": cannot open");
  if (!S_ISREG(sb.st_mode))
    fail("cli", "--prompts-file ", path, ": not a regular file");
  if (sb.st_size > kPromptsFileLimit)
    fail("cli", "--prompts-file ", path, ": ", static_cast<int64_t>(sb.st_size),
         " bytes exceeds the limit of 64 MiB");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<std::runtime_error>("cli", "--prompts-file ", path, ": cannot open");
  std::string text;
  char buf[1 << 16];
  while (in.read(buf, sizeof(buf)) || in.gcount() > 0) {
    text.append(buf, static_cast<size_t>(in.gcount()));
    if (static_cast<int64_t>(text.size()) > kPromptsFileLimit)
      fail("cli", "--prompts-file ", path, ": more than the limit of 64 MiB");
  }
  return text;
}

std::vector<std::vector<int32_t>> read_prompts(const std::string& path, const Tokenizer* tok,
                                               int64_t vocab) {
  std::istringstream in(read_prompts_text(path));
  std::vector<std::vector<int32_t>> out;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (is_id_list(line)) {
      const std::string what = cat("--prompts-file ", path, " line ", n);
      std::vector<int32_t> ids;
      std::string item;
      for (std::istringstream items(line); std::getline(items, item, ',');) {
        int32_t id = 0;
        if (std::string why = parse_token_id(item, &id); !why.empty()) fail("cli", what, ": ", why);
        ids.push_back(id);
      }
      check_vocab(ids, what, vocab);
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

// Every rank's (KV-cache bytes, workspace bytes), gathered at every rank as exact integers.
std::vector<int64_t> gather_memory(const comm::Group& world, uint64_t kv, uint64_t workspace) {
  const int64_t mine[2] = {static_cast<int64_t>(kv), static_cast<int64_t>(workspace)};
  std::vector<int64_t> all(2 * world.size());
  world.all_gather(mine, all.data(), 2, DType::I64);
  return all;
}

// --mem-stats after the run: what each rank allocated beside its weights.
void print_memory(const std::vector<int64_t>& mem, size_t sequences) {
  for (size_t w = 0; w < mem.size() / 2; ++w)
    std::fprintf(stderr,
                 "[mem] rank %zu: KV cache %.2f MiB (%zu sequences), workspace %.2f MiB (%lld "
                 "bytes)\n",
                 w, mem[2 * w] / 1048576.0, sequences, mem[2 * w + 1] / 1048576.0,
                 static_cast<long long>(mem[2 * w + 1]));
}

// --moe-stats (collective over the world; rank 0 prints): rows (token, expert pairs) per expert
// and per EP rank over all layers, the max/mean imbalance over EP ranks, and the all-to-all time
// of the EP group against the generation's wall time. TP ranks hold the same rows: TP rank 0's
// are counted. --enable-expert-parallel: the TP ranks are the EP ranks, each with its own experts
// (all counted), and the time is the MoE all-reduce's (group ep_tp).
void print_moe_stats(RankContext& ctx, double seconds) {
  const ModelConfig& c = ctx.config;
  const int64_t E = c.num_local_experts;
  const bool over_tp = ctx.model.experts_over_tp();
  std::vector<int64_t> mine = ctx.model.moe_expert_rows();
  if (ctx.mesh.tp_rank() != 0 && !over_tp) std::fill(mine.begin(), mine.end(), 0);
  const comm::CommStats& moe_comm = ctx.model.expert_group().stats();
  mine.push_back(static_cast<int64_t>(
      (over_tp ? moe_comm.get(comm::Kind::AllReduce) : moe_comm.get(comm::Kind::AllToAll))
          .seconds *
      1e9));
  mine.push_back(static_cast<int64_t>(seconds * 1e9));
  std::vector<int64_t> all(mine.size() * ctx.world.size());
  ctx.world.all_gather(mine.data(), all.data(), mine.size(), DType::I64);
  if (!ctx.is_root()) return;
  std::vector<int64_t> per_expert(E, 0);
  int64_t a2a_ns = 0, wall_ns = 0;
  for (int w = 0; w < ctx.world.size(); ++w) {
    const int64_t* v = &all[w * mine.size()];
    for (int64_t e = 0; e < E; ++e) per_expert[e] += v[e];
    a2a_ns = std::max(a2a_ns, v[E]);
    wall_ns = std::max(wall_ns, v[E + 1]);
  }
  std::string line;
  for (int64_t e = 0; e < E; ++e) line += cat(e ? ", " : "", e, ": ", per_expert[e]);
  std::fprintf(stderr, "[moe] rows per expert (token x expert pairs, all layers): %s\n",
               line.c_str());
  const int EP = ctx.model.expert_group().size();
  int64_t most = 0, sum = 0;
  for (int r = 0; r < EP; ++r) {
    const parallel::ShardSpec s = parallel::expert_range(E, EP, r);
    int64_t rows = 0;
    for (int64_t e = s.begin; e < s.end; ++e) rows += per_expert[e];
    most = std::max(most, rows);
    sum += rows;
    std::fprintf(stderr, "[moe] EP rank %d: experts [%lld, %lld), %lld rows\n", r,
                 static_cast<long long>(s.begin), static_cast<long long>(s.end),
                 static_cast<long long>(rows));
  }
  std::fprintf(stderr,
               "[moe] imbalance over %d EP ranks: max/mean %.3f; %s %.3f ms of %.3f ms "
               "wall (%.1f%%, the slowest rank's)\n",
               EP, sum > 0 ? static_cast<double>(most) * EP / static_cast<double>(sum) : 0.0,
               over_tp ? "all-reduce (ep_tp)" : "all-to-all", a2a_ns * 1e-6, wall_ns * 1e-6,
               wall_ns > 0 ? 100.0 * static_cast<double>(a2a_ns) / static_cast<double>(wall_ns)
                           : 0.0);
}

// Batched and/or pipelined generation: prints each sequence, then the pipeline's summary.
int run_batch(const Options& o, const std::vector<std::vector<int32_t>>& prompts,
              const Tokenizer* tok) {
  BatchOptions bo;
  bo.max_tokens = o.max_tokens;
  bo.ignore_eos = o.ignore_eos;
  bo.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  bo.micro_batches = o.micro_batches;
  bo.prefill_chunk = o.prefill_chunk;
  bo.collect_logits = o.print_logits;
  bo.check_finite = o.check_finite;
  const bool ids_out = o.print_ids || !tok;
  auto print_sequences = [&](const std::vector<std::vector<int32_t>>& seqs) {
    for (size_t i = 0; !o.quiet && i < seqs.size(); ++i) {
      std::printf("[%zu] ", i);
      if (ids_out) {
        for (int32_t t : seqs[i]) std::printf("%d ", t);
      } else {
        std::printf("%s", tok->decode(seqs[i]).c_str());
      }
      std::printf("\n");
    }
    std::fflush(stdout);
  };
  run_model(o.engine, [&](RankContext& ctx) {
    ctx.world.barrier();  // the ranks start together: idle time is the pipeline's, not loading's
    // One process prints all of stdout: the last stage's first TP rank, which holds the logits and
    // its own record of every token. (Two printers, even ordered by a barrier, can interleave
    // mid-line under mpirun, whose output forwarding merges the processes' pipes in arbitrary
    // chunks.)
    const bool printer = ctx.mesh.last_stage() && ctx.mesh.tp_ep().rank() == 0;
    // The printer's own record of the tokens as they come, so that a run that fails part way
    // (a rank's error, a comm timeout) still prints what it generated before the error line.
    std::vector<std::vector<int32_t>> so_far(prompts.size());
    TokenCallback on_token;
    if (printer) on_token = [&](int i, int32_t t) { so_far[i].push_back(t); };
    std::vector<Request> requests;
    for (const auto& p : prompts) requests.push_back({p, bo.max_tokens});
    BatchResult r;
    bo.split_pp_hops = ctx.split_pp_hops;
    try {
      r = generate_batch(ctx.model, ctx.mesh, requests, bo, on_token);
    } catch (...) {
      if (printer) print_sequences(so_far);
      throw;
    }
    // Each rank's (busy, wall, prompt-pass busy, prompt-pass end) in nanoseconds, gathered at
    // every rank as exact integers (they were floats, read at stride 5 of 4: other ranks' values
    // and past the end). All four are integers of one clock on one rank from that rank's own start
    // (BatchResult): busy <= wall and prompt-pass busy <= prompt-pass end <= the largest
    // prompt-pass end, so no share below can leave [0, 100%], and no clamp is needed.
    const int64_t mine[4] = {r.busy_ns, r.wall_ns, r.prefill_busy_ns, r.prefill_ns};
    std::vector<int64_t> all(4 * ctx.world.size());
    ctx.world.all_gather(mine, all.data(), 4, DType::I64);
    const std::vector<int64_t> mem = gather_memory(ctx.world, r.kv_cache_bytes, r.workspace_bytes);
    size_t total = 0;
    for (const auto& seq : r.sequences) total += seq.tokens.size();
    if (printer) {
      std::vector<std::vector<int32_t>> seqs;
      for (const auto& seq : r.sequences) seqs.push_back(seq.tokens);
      print_sequences(seqs);
      for (size_t i = 0; o.print_logits && i < r.sequences.size(); ++i)
        for (size_t s = 0; s < r.sequences[i].logits.size(); ++s) {
          std::printf("logits[%zu][%zu]:", i, s);
          for (float v : r.sequences[i].logits[s]) std::printf(" %.6g", v);
          std::printf("\n");
        }
      std::fflush(stdout);
    }
    if (o.moe_stats) print_moe_stats(ctx, r.seconds);
    if (!ctx.is_root()) return;
    if (o.engine.mem_stats) print_memory(mem, r.sequences.size());
    const int P = ctx.mesh.pp_size(), M = r.micro_batches;
    std::fprintf(stderr,
                 "[generate] tp %d x pp %d, %zu sequences in %d micro-batches: %zu tokens in %.3f "
                 "s (%.1f tok/s)\n",
                 ctx.mesh.tp_size(), P, r.sequences.size(), M, total, r.seconds,
                 total / std::max(r.seconds, 1e-9));
    if (P > 1) {
      // The prompt pass ends when its last stage is done with it: the latest end over ranks.
      int64_t prefill_end = 1;
      for (int w = 0; w < ctx.world.size(); ++w) prefill_end = std::max(prefill_end, all[4 * w + 3]);
      // busy / wall of one rank (both in [0, wall] by the above; a zero wall is an idle rank).
      auto share = [](int64_t part, int64_t whole) {
        return whole > 0 ? static_cast<double>(part) / static_cast<double>(whole) : 0.0;
      };
      double idle_all = 0, idle_prefill = 0;
      for (int s = 0; s < P; ++s) {
        const int64_t* v = &all[4 * ctx.mesh.global_rank(0, 0, s)];
        const double run = share(v[0], v[1]), prompt = share(v[2], prefill_end);
        std::fprintf(stderr,
                     "[pipeline] stage %d: busy %.1f%% of the run, %.1f%% of the prompt pass\n", s,
                     100.0 * run, 100.0 * prompt);
        idle_all += 1.0 - run;
        idle_prefill += 1.0 - prompt;
      }
      std::fprintf(stderr,
                   "[pipeline] bubble: prompt pass %.3f (GPipe formula (p-1)/(m+p-1) = %.3f), "
                   "whole run %.3f\n",
                   idle_prefill / P, pipeline::bubble_formula(pipeline::ScheduleKind::GPipe, P, M),
                   idle_all / P);
    }
  });
  return 0;
}

// SIGINT/SIGTERM: the handler only records the signal and asks the loop to stop (an atomic flag);
// the loop ends at its next plan, the tokens so far are printed, and run() exits non-zero. A second
// signal while stopping ends the process the default way.
volatile std::sig_atomic_t g_signal = 0;

extern "C" void on_stop_signal(int sig) {
  if (g_signal != 0) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_signal = sig;
  request_stop();
}

int run_generate(const Options& o);

int run(const Options& o) {
  clear_stop();
  g_signal = 0;
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  const int rc = run_generate(o);
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (g_signal != 0)
    fail<std::runtime_error>("cli", "generate stopped by signal ", static_cast<int>(g_signal),
                             " (", g_signal == SIGINT ? "SIGINT" : "SIGTERM",
                             "); the tokens generated so far are printed above");
  return rc;
}

int run_generate(const Options& o) {
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
  ModelConfig config;
  open_model(o.engine.model, &config);
  if (tok) {
    if (tok->vocab_size() > config.vocab_size)
      fail("cli", "the tokenizer has ", tok->vocab_size(), " tokens but the model's vocab_size is ",
           config.vocab_size, ": they do not belong together");
  }
  if (o.moe_stats && !config.is_moe())
    fail("cli", "--moe-stats needs a mixture-of-experts model (this one is dense)");
  if (!o.prompts_file.empty())
    return run_batch(o, read_prompts(o.prompts_file, tok.get(), config.vocab_size), tok.get());
  std::vector<int32_t> prompt;
  if (!o.prompt_ids.empty()) {
    // CLI11 checked each value against int32 (the option's validator); now the vocabulary.
    prompt.assign(o.prompt_ids.begin(), o.prompt_ids.end());
    check_vocab(prompt, "--prompt-ids", config.vocab_size);
  } else {
    if (!tok)
      fail("cli", "--prompt needs a tokenizer, and none was found beside ", o.engine.model,
           " (tokenizer.model or tokenizer.json); give --tokenizer FILE or --prompt-ids");
    prompt = tok->encode(o.prompt, true);
  }
  // EP replicas learn each step's plan from the batch loop's stage-wide broadcast; --moe-stats is
  // the batch loop's report.
  if (o.engine.pp > 1 || o.engine.ep > 1 || o.moe_stats || o.micro_batches > 0)
    return run_batch(o, {prompt}, tok.get());
  GenerateOptions go;
  go.max_tokens = o.max_tokens;
  go.ignore_eos = o.ignore_eos;
  go.sampling = sp;
  go.prefill_chunk = o.prefill_chunk;
  go.collect_logits = o.print_logits;
  go.check_finite = o.check_finite;
  const bool ids_out = o.print_ids || !tok;
  run_model(o.engine, [&](RankContext& ctx) {
    ctx.world.barrier();  // the ranks start together, so the prompt's time is the prompt's
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
    const std::vector<int64_t> mem = gather_memory(ctx.world, r.kv_cache_bytes, r.workspace_bytes);
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
    // The text ends before the statistics reach stderr (2>&1 into a pipe would otherwise put them
    // on the text's last line: stdout is buffered there, stderr is not).
    std::fflush(stdout);
    std::fprintf(stderr,
                 "[generate] tp %d: prompt %zu tokens in %.1f ms (%.1f tok/s); %zu tokens, decode "
                 "%.2f tok/s%s\n",
                 ctx.tp.size(), prompt.size(), r.prefill_seconds * 1e3,
                 prompt.size() / std::max(r.prefill_seconds, 1e-9), n,
                 n > 1 ? (n - 1) / std::max(r.decode_seconds, 1e-9) : 0.0,
                 r.stopped_at_eos ? " (stopped at EOS)" : "");
    if (o.engine.mem_stats) print_memory(mem, 1);
  });
  return 0;
}

[[maybe_unused]] const bool registered = register_command(
    {"generate", "Generate text from a prompt (greedy by default)", [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       add_engine_flags(app, o->engine);
       app.add_option("--ep", o->engine.ep,
                      "Expert-parallel ranks per TP rank (mixture-of-experts models): attention "
                      "replicated, experts split; world size = tp x ep x pp (docs/moe.md)")
           ->check(CLI::PositiveNumber);
       app.add_flag("--enable-expert-parallel", o->engine.enable_expert_parallel,
                    "Mixture of experts, vLLM's layout: whole experts placed over the --tp ranks "
                    "(E/TP each), attention and LM head TP-split; not with --ep (docs/moe.md)");
       app.add_flag("--moe-stats", o->moe_stats,
                    "Print rows per expert and per EP rank, their imbalance and the all-to-all "
                    "time share (mixture-of-experts models)");
       app.add_option("--prompt", o->prompt, "Prompt text (needs a tokenizer beside the model)");
       app.add_option("--prompt-ids", o->prompt_ids, "Prompt as token ids: 1,2,3")
           ->delimiter(',')
           ->check(CLI::Validator(
               [](std::string& item) {
                 int32_t id = 0;
                 return parse_token_id(item, &id);
               },
               "token id", "token id"));
       app.add_option("--prompts-file", o->prompts_file,
                      "Generate for every line (text or token ids 1,2,3) together, as one batch");
       app.add_option("--micro-batches", o->micro_batches,
                      "Micro-batches the batch is cut into (default: the number of --pp stages)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--prefill-chunk", o->prefill_chunk,
                      "Feed prompts at most N tokens per step (default: whole prompts)")
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
       app.add_option_function<std::string>(
              "--seed",
              [o](const std::string& text) {
                if (std::string why = parse_seed(text, &o->seed); !why.empty())
                  throw CLI::ValidationError(why);
              },
              "Sampling seed, an integer in [0, 2^64) (default 0)")
           ->type_name("UINT");
       app.add_flag("--check-finite", o->check_finite,
                    "Scan the activations after every layer; fail naming the layer where a "
                    "non-finite value first appears (the final logits are always checked)");
       app.add_flag("--print-ids", o->print_ids, "Print token ids instead of text");
       app.add_flag("--ignore-eos", o->ignore_eos, "Do not stop at the end-of-sequence token");
       app.add_flag("--print-logits", o->print_logits,
                    "Print the full logits of every step (gathered)");
       app.add_flag("--quiet", o->quiet, "Print no tokens (timing only)");
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
