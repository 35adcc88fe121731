// The training loop of `parallm train`: launches the ranks (threads, or this process's rank under
// mpirun) as a TP x PP x DP mesh (comm::Mesh's rank order: TP fastest, then DP, then PP), gives
// each its ParamStore and TrainModel (with PP: the layers of its stage's chunks), and runs the
// steps. PP = 1:
//
//   for each micro-batch of this DP rank's block of the global batch (data.h's fixed order):
//     loss += forward_backward(micro-batch, grad_scale = 1 / (G*S))
//     (the last micro-batch's backward starts the DP bucket reductions as gradients complete)
//   wait for the buckets (dp.h); loss = DP sum / (G*S)
//   global gradient norm (sharded slices once each, TP-replicated tensors once, ZeRO shards once)
//   clip factor, learning rate of the step, AdamW on the owned segments (ZeRO: then all-gather)
//
// PP > 1: the same micro-batches are the pipeline's; each stage runs its action list of
// pipeline::make_schedule(--schedule, pp, m, v) through pipeline::execute_stage: forwards and
// backwards per (micro-batch, chunk) (ZB-H1: B and W apart), activations sent forward and their
// gradients backward (pipeline::StageLink). The DP buckets start as each chunk's last backward
// completes its gradients. With tied embeddings the first stage's embedding gradient and the last
// stage's copy (the LM head) are summed over the two stages before their DP reduction. The loss is
// summed on the last stage and shared over PP; the gradient norm sums TP, then PP, then DP (ZeRO).
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
  // --ep: expert parallelism for mixture-of-experts models (docs/moe.md, "Training"). The EP
  // ranks are data-parallel ranks (the data order is DP x EP's), each computing E/EP experts;
  // world = tp * pp * dp * ep.
  int ep = 1;
  int64_t bucket_mb = 25;    // DP bucket size in MB (decimal: 25 -> 25e6 bytes); tests go smaller
  int64_t bucket_bytes = 0;  // when > 0, overrides bucket_mb (tests)
  bool overlap = true;       // reduce buckets during the backward
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
  // 3D training (docs/training.md, "Pipeline and 3D training").
  int pp = 1;                      // --pp: pipeline stages; world = tp * pp * dp
  std::string schedule = "1f1b";   // --schedule gpipe|1f1b|interleaved|zb-h1 (PP > 1)
  int virtual_stages = 1;          // --virtual-stages V: chunks per stage (interleaved only)
  std::vector<int64_t> pp_layers;  // --pp-layers: layers per virtual stage (pp * V of them)
  bool sp = false;                 // --sp: sequence parallelism (a no-op at TP 1)
  std::string recompute = "none";  // --recompute none|selective|full
  bool stats = false;              // --stats: print the pipeline measurements at the end
  std::string trace;               // --trace FILE: Chrome trace JSON of every rank
  bool comm_stats = false;         // --comm-stats: the communication table at exit (rank 0's)
  // Not flags: data given directly (bench, tests); replaces --data when set.
  std::shared_ptr<const TokenData> data_ids, val_ids;
  bool keep_params = false;  // fill TrainResult::final_params (tests)
};

// What one pipeline stage measured (TP rank 0, DP rank 0 of the stage), over the steps after the
// first (all steps when there is one).
struct StageStats {
  int stage = 0;
  int64_t layers = 0;     // layers the stage's chunks hold
  double busy_s = 0;      // inside the forward/backward callbacks, summed over the steps
  double makespan_s = 0;  // execute_stage's start to end, summed over the steps
  double bubble = 0;      // 1 - busy / makespan
  double f_ms = 0, b_ms = 0, w_ms = 0;  // mean per (micro-batch, chunk) action (W: ZB-H1 only;
                                        // b_ms is B alone there)
  // Held (micro-batch, chunk) activation states, the most at once (TrainModel::ActivationStats),
  // and the schedule's count (pipeline::simulate's peak_in_flight_chunks).
  int peak_in_flight_chunks = 0, schedule_in_flight_chunks = 0;
  double peak_in_flight = 0;  // micro-batch units (chunks / V)
  int64_t peak_activation_bytes = 0;
  double formula_activation_bytes = -1;  // per state x in flight (plan's formula); < 0 unknown
};

// The simulator replaying measured durations: the schedule at `stages` stages with the measured
// mean F, B (and W) per chunk, against the closed form.
struct ReplayStats {
  int stages = 0, micro_batches = 0;
  double bubble = 0, formula = 0;
};

struct StepRecord {
  int64_t step = 0;  // 1-based: the number of steps done after this one
  double loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, seconds = 0;
  // MoE: the mean over the step's micro-batches of the load-balancing loss (before
  // router_aux_loss_coef; `loss` is the LM loss alone, the optimised loss is
  // loss + router_aux_loss_coef x aux_loss). 0 for dense models.
  double aux_loss = 0;
  double val_loss = -1;  // < 0: not evaluated at this step
};

struct TrainResult {
  bool stopped = false;           // ended early by request_training_stop()
  std::vector<StepRecord> steps;  // the steps this run made (after a resume: from there on)
  ModelConfig config;
  int64_t param_count = 0;                // the model's parameters
  std::vector<uint64_t> optimizer_bytes;  // per world rank: values + grads + m + v held
  std::vector<int64_t> param_numel;       // per world rank: parameter elements held
  std::vector<int64_t> state_numel;       // per world rank: elements of m (and of v) held
  double seconds = 0;                     // the steps' wall time
  int threads = 1;                        // per rank
  // PP > 1: per stage, and the whole pipeline's bubble (1 - sum busy / (p * max makespan)) with
  // the schedule's formula; the simulator's replay at this p and at p = 2..8.
  std::vector<StageStats> stages;
  std::string schedule_name;  // "1f1b p=4 m=8"
  double bubble = 0, bubble_formula = 0, sim_bubble = 0;
  std::vector<ReplayStats> replay;
  // keep_params: every tensor whole after the last step (checkpoint names; with tied embeddings
  // and PP > 1 the last stage's copy as "tied_copy:<name>").
  std::vector<std::pair<std::string, std::vector<float>>> final_params;
};

// The --stats report of a run with PP > 1 (what `train --stats` and `bench train` print).
void print_pipeline_stats(const TrainResult& r, std::ostream& out);

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
