// parallm train: trains a LLaMA model on one rank or a TP x PP x DP mesh (ranks as threads, or
// one process per rank under mpirun), with AdamW, gradient accumulation, pipeline schedules
// (GPipe, 1F1B, interleaved, ZB-H1), sequence parallelism, activation recomputation, ZeRO-1 and
// checkpoints that `parallm generate --model DIR` loads as they are. The loop is train/trainer.h.
#include <algorithm>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <memory>

#include "parallm/cli/command.h"
#include "parallm/cli/train_flags.h"
#include "parallm/core/error.h"
#include "parallm/train/trainer.h"

namespace parallm::cli {
namespace {

// SIGINT/SIGTERM: the first asks the loop to stop after its step (saving with --save); a second
// ends the process the default way.
volatile std::sig_atomic_t g_signal = 0;

extern "C" void on_train_stop_signal(int sig) {
  if (g_signal != 0) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_signal = sig;
  train::request_training_stop();
}

int run(const train::TrainOptions& o) {
  train::clear_training_stop();
  g_signal = 0;
  std::signal(SIGINT, on_train_stop_signal);
  std::signal(SIGTERM, on_train_stop_signal);
  train::TrainResult r;
  try {
    r = train::run_training(o, &std::cerr);
  } catch (...) {
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
    throw;
  }
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (r.stopped) {
    const int64_t at = r.steps.empty() ? 0 : r.steps.back().step;
    fail<std::runtime_error>("train", "stopped by signal after step ", at,
                             o.save.empty() ? " (no --save: nothing saved)"
                                            : cat("; checkpoint saved to ", o.save,
                                                  " (continue "
                                                  "with --resume ",
                                                  o.save, ")"));
  }
  if (!r.steps.empty() && !o.quiet) {
    const train::StepRecord& last = r.steps.back();
    const double tokens =
        static_cast<double>(r.steps.size()) * static_cast<double>(o.global_batch * o.seq_len);
    std::fprintf(stderr, "[train] done: %zu steps in %.1f s (%.0f tok/s), final loss %.4f\n",
                 r.steps.size(), r.seconds, tokens / std::max(r.seconds, 1e-9), last.loss);
  }
  return 0;
}

// --seed as an unsigned 64-bit integer; "-1" is refused instead of wrapping.
std::string parse_u64(const std::string& text, uint64_t* out, const char* flag) {
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size())
    return cat(flag, " must be an integer in [0, 2^64), got \"", text, "\"");
  *out = v;
  return "";
}

[[maybe_unused]] const bool registered = register_command(
    {"train", "Train a LLaMA model (AdamW; tensor and data parallel, ZeRO-1; checkpoints)",
     [](CLI::App& app) {
       auto o = std::make_shared<train::TrainOptions>();
       app.add_option("--model", o->model,
                      "Start from a model: a Hugging Face directory (config.json + safetensors) "
                      "or a llama2.c .bin");
       app.add_option("--init", o->init,
                      "Start from random weights of a shape: a preset (tiny, small, bench-30m, "
                      "tinyllama-1.1b) or a config.json. Init: matrices and embeddings normal(0, "
                      "0.02), o_proj and down_proj normal(0, 0.02/sqrt(2*layers)), norms 1, "
                      "seeded by --seed");
       app.add_option("--tokenizer", o->tokenizer,
                      "tokenizer.model or tokenizer.json: tokenizes text data; with --init it sets "
                      "the vocabulary; copied into checkpoints");
       app.add_option("--data", o->data,
                      "Training data: a token file (name ending in .bin: raw little-endian uint16 "
                      "ids, as nanoGPT and llm.c write them; --data-dtype u32 for larger "
                      "vocabularies), or any other name: text, tokenized with the tokenizer");
       app.add_option("--val-data", o->val_data, "Validation data, same formats as --data");
       app.add_option("--data-dtype", o->data_dtype, "Ids of a .bin token file: u16 (default), u32")
           ->check(CLI::IsMember({"u16", "u32"}));
       app.add_flag("--shuffle", o->shuffle,
                    "Read the sequences in a seeded random order, redrawn every pass over the "
                    "data (docs/training.md)");
       app.add_option("--seq-len", o->seq_len, "Tokens per sequence (default 128)")
           ->check(CLI::PositiveNumber);
       app.add_option("--micro-batch-size", o->micro_batch,
                      "Sequences per forward/backward on one DP rank (default 1)")
           ->check(CLI::PositiveNumber);
       app.add_option("--global-batch-size", o->global_batch,
                      "Sequences per optimizer step over all DP ranks; a multiple of "
                      "micro-batch-size x dp (default 8)")
           ->check(CLI::PositiveNumber);
       app.add_option("--steps", o->steps, "Optimizer steps (default 100)")
           ->check(CLI::PositiveNumber);
       app.add_option("--lr", o->adamw.lr, "Peak learning rate (default 3e-4)")
           ->check(CLI::PositiveNumber);
       app.add_option("--min-lr", o->adamw.min_lr, "Cosine schedule's final learning rate (0)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--warmup-steps", o->adamw.warmup_steps,
                      "Linear warm-up steps: lr*(k+1)/warmup (default 0)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--lr-schedule", o->adamw.schedule, "constant or cosine (default cosine)")
           ->check(CLI::IsMember({"constant", "cosine"}));
       app.add_option("--weight-decay", o->adamw.weight_decay,
                      "AdamW's decoupled weight decay on 2-D tensors (default 0.1)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--beta1", o->adamw.beta1, "AdamW beta1 (default 0.9)")
           ->check(CLI::Range(0.0, 0.999999999));
       app.add_option("--beta2", o->adamw.beta2, "AdamW beta2 (default 0.95)")
           ->check(CLI::Range(0.0, 0.999999999));
       app.add_option("--eps", o->adamw.eps, "AdamW epsilon (default 1e-8)")
           ->check(CLI::PositiveNumber);
       app.add_option("--grad-clip", o->adamw.grad_clip,
                      "Clip the global gradient norm to this (0: off; default 1)")
           ->check(CLI::NonNegativeNumber);
       app.add_option_function<std::string>(
              "--seed",
              [o](const std::string& text) {
                if (std::string why = parse_u64(text, &o->seed, "--seed"); !why.empty())
                  throw CLI::ValidationError(why);
              },
              "Seed of --init and --shuffle (default 0)")
           ->type_name("UINT");
       app.add_option("--dtype", o->dtype,
                      "Compute dtype: f32 (the reference) or bf16 (f32 master weights and "
                      "optimizer state either way)")
           ->check(CLI::IsMember({"f32", "bf16"}));
       app.add_option("--threads", o->threads,
                      "Threads per rank (default: cores / ranks on this machine)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--tp", o->tp, "Tensor-parallel ranks")->check(CLI::PositiveNumber);
       app.add_option("--dp", o->dp, "Data-parallel replicas (world size = tp x pp x dp)")
           ->check(CLI::PositiveNumber);
       add_pipeline_flags(app, *o);
       app.add_option("--zero", o->zero,
                      "1: shard the optimizer state over DP (Megatron's distributed optimizer)")
           ->check(CLI::IsMember({0, 1}));
       app.add_option("--bucket-mb", o->bucket_mb, "DP gradient bucket size in MB (default 25)")
           ->check(CLI::PositiveNumber);
       app.add_option("--save", o->save,
                      "Checkpoint directory (Hugging Face format + optimizer state), written at "
                      "the end and every --save-every steps");
       app.add_option("--save-every", o->save_every, "Save every K steps (0: only at the end)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--stop-after", o->stop_after,
                      "End after step K as if interrupted (with --save, the checkpoint is written "
                      "there); the schedule stays --steps'")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--resume", o->resume,
                      "Continue a run bit for bit from a checkpoint directory (any TP x DP)");
       app.add_option("--log-json", o->log_json,
                      "Write one JSON object per step: step, loss, lr, grad_norm, tokens_per_s "
                      "(and val_loss)");
       app.add_option("--eval-every", o->eval_every,
                      "Evaluate on --val-data every K steps (0: never)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--eval-batches", o->eval_batches,
                      "Global batches of --val-data per evaluation (default 1)")
           ->check(CLI::PositiveNumber);
       app.add_option("--backend", o->backend,
                      "Comm backend: auto (mpi under mpirun, else local), local, mpi")
           ->check(CLI::IsMember({"auto", "local", "mpi"}));
       app.add_option("--comm-timeout", o->comm_timeout_s,
                      "Seconds a blocking collective waits before failing (default 300)")
           ->check(CLI::PositiveNumber);
       app.add_flag("--quiet", o->quiet, "No progress lines");
       app.add_flag("--stats", o->stats,
                    "With --pp > 1: print per stage the busy time and bubble against the "
                    "schedule's formula, F/B/W times, micro-batches in flight against the "
                    "schedule's count, peak activation bytes, and the simulator's replay");
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
