// The training loop of `parallm train`: launches the ranks (threads, or this process's rank under
// mpirun) as a TP x DP mesh (rank order TP, DP, PP with PP = 1), gives each its ParamStore and
// TrainModel, and runs the steps:
//
//   for each micro-batch of this DP rank's block of the global batch (data.h's fixed order):
//     loss += forward_backward(micro-batch, grad_scale = 1 / (G*S))
//     (the last micro-batch's backward starts the DP bucket reductions as gradients complete)
//   wait for the buckets (dp.h); loss = DP sum / (G*S)
//   global gradient norm (sharded slices once each, TP-replicated tensors once, ZeRO shards once)
//   clip factor, learning rate of the step, AdamW on the owned segments (ZeRO: then all-gather)
//
// Errors in the options or the data are found before any rank starts or any file is written,
// and thrown as std::invalid_argument naming the flag and the value.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "parallm/model/config.h"
#include "parallm/train/data.h"
#include "parallm/train/optimizer.h"

namespace parallm::train {

struct TrainOptions {
  // The model: exactly one of --model (a Hugging Face directory, or any file open_model reads)
  // and --init (a shape preset or a config.json, randomly initialised by init_params, seeded by
  // --seed); --resume alone takes the model from the checkpoint.
  std::string model, init, tokenizer;
  std::string data, val_data;
  std::string data_dtype = "u16";  // u16 or u32: the ids of a token file (a name ending in .bin;
                                   // any other name is text, tokenized at start-up)
  bool shuffle = false;
  int64_t seq_len = 128;
  int64_t micro_batch = 1;   // --micro-batch-size, sequences
  int64_t global_batch = 8;  // --global-batch-size, sequences
  int64_t steps = 100;
  AdamWConfig adamw;  // lr, min_lr, warmup, schedule, betas, eps, weight decay, clip (steps: above)
  uint64_t seed = 0;
  std::string dtype = "f32";  // compute dtype: f32 or bf16 (f32 master weights either way)
  int threads = 0;            // per rank; 0: cores / ranks on this machine
  int tp = 1, dp = 1, zero = 0;
  int64_t bucket_mb = 25;     // DP bucket size in MB (decimal: 25 -> 25e6 bytes); tests go smaller
  int64_t bucket_bytes = 0;   // when > 0, overrides bucket_mb (tests)
  bool overlap = true;        // reduce buckets during the backward
  std::string save;
  int64_t save_every = 0;
  // When > 0: end after this step, as if interrupted there (the schedule is still --steps'); with
  // --save the checkpoint is written at that step. For resume tests.
  int64_t stop_after = 0;
  std::string resume;
  std::string log_json;
  int64_t eval_every = 0, eval_batches = 1;
  std::string backend = "auto";
  double comm_timeout_s = 300;
  bool quiet = false;  // no progress lines
  // Not flags: data given directly (bench, tests); replaces --data when set.
  std::shared_ptr<const TokenData> data_ids, val_ids;
};

struct StepRecord {
  int64_t step = 0;  // 1-based: the number of steps done after this one
  double loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, seconds = 0;
  double val_loss = -1;  // < 0: not evaluated at this step
};

struct TrainResult {
  bool stopped = false;           // ended early by request_training_stop()
  std::vector<StepRecord> steps;  // the steps this run made (after a resume: from there on)
  ModelConfig config;
  int64_t param_count = 0;               // the model's parameters
  std::vector<uint64_t> optimizer_bytes;  // per world rank: values + grads + m + v held
  std::vector<int64_t> param_numel;       // per world rank: parameter elements held
  std::vector<int64_t> state_numel;       // per world rank: elements of m (and of v) held
  double seconds = 0;                     // the steps' wall time
  int threads = 1;                        // per rank
};

// Checks the options and the data, launches the ranks and trains. Progress lines go to
// `progress` (stderr when null) from world rank 0. Returns what rank 0 saw (under mpirun, the
// other processes return their own partial view: their steps' records are the same).
TrainResult run_training(const TrainOptions& options, std::ostream* progress = nullptr);

// Asks a running training to stop after its current step (async-signal-safe: an atomic store; the
// CLI calls it from SIGINT/SIGTERM). The ranks agree on the step (a world all-reduce of the flag
// after each step), save the checkpoint there when --save is given, and run_training returns with
// `stopped` set. clear_training_stop() resets it.
void request_training_stop();
void clear_training_stop();

// The model config a run would train, after the checks that need no data (for the CLI and bench).
ModelConfig resolve_config(const TrainOptions& options);

}  // namespace parallm::train
