// parallm bench train: training tokens/s and FLOP rate of the training loop (train/trainer.h) on
// random token ids, for a given model or shape.
//
// FLOPs per token (stated, PaLM's appendix B formula): 6 * N + 12 * L * H * S, N the model's
// parameters (param_count: embeddings included, once when tied), L layers, H the hidden size
// (heads x head dim), S the sequence length: 6N for the forward (2N) and backward (4N) matrix
// products, 12*L*H*S for the attention scores and their use, forward and backward, counting the
// full S x S matrix (causal masking halves the useful part; the formula keeps PaLM's convention).

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "parallm/cli/command.h"
#include "parallm/cli/train_flags.h"
#include "parallm/comm/launch.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/kernels/cpu.h"
#include "parallm/train/trainer.h"

namespace parallm::cli {
namespace {

struct Options {
  train::TrainOptions t;
  int64_t measure_steps = 4, warmup = 1;
  bool no_overlap = false;
};

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      if (c != std::string::npos) return line.substr(line.find_first_not_of(' ', c + 1));
    }
  return "unknown CPU";
}

int run(Options o) {
  train::TrainOptions& t = o.t;
  if (t.model.empty() && t.init.empty()) t.init = "bench-30m";
  const std::string shown = t.model.empty() ? t.init : t.model;
  if (o.measure_steps < 1) fail("bench", "--steps must be >= 1, got ", o.measure_steps);
  if (o.warmup < 0) fail("bench", "--warmup must be >= 0, got ", o.warmup);
  // A pipeline needs micro-batches to fill it: 2 x pp per DP rank by default (a multiple of pp, as
  // the interleaved schedule needs).
  if (t.global_batch == 0) t.global_batch = t.micro_batch * t.dp * t.ep * (t.pp > 1 ? 2 * t.pp : 1);
  t.steps = o.warmup + o.measure_steps;
  t.overlap = !o.no_overlap;
  t.adamw.lr = 1e-4;
  t.adamw.schedule = "constant";
  t.quiet = true;
  const ModelConfig config = train::resolve_config(t);
  // Random ids, enough for every step without wrapping.
  const int64_t n = t.steps * t.global_batch * t.seq_len + 1;
  std::mt19937_64 rng(t.seed);
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(config.vocab_size - 1));
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = dist(rng);
  t.data_ids = std::make_shared<train::TokenData>(
      train::TokenData::from_ids(std::move(ids), config.vocab_size));
  const train::TrainResult r = train::run_training(t);
  if (comm::launched_rank() != 0) return 0;
  double secs = 0;
  int64_t measured = 0;
  for (size_t i = static_cast<size_t>(o.warmup); i < r.steps.size(); ++i) {
    secs += r.steps[i].seconds;
    ++measured;
  }
  const double tokens = static_cast<double>(measured * t.global_batch * t.seq_len);
  const double tps = tokens / std::max(secs, 1e-9);
  const double N = static_cast<double>(r.param_count);
  const double attn = 12.0 * static_cast<double>(config.num_hidden_layers) *
                      static_cast<double>(config.q_dim()) * static_cast<double>(t.seq_len);
  const double flops_per_token = 6.0 * N + attn;
  std::printf(
      "bench train: %s (%lld parameters), tp %d x pp %d x dp %d%s%s%s%s, %s, %d threads/rank\n",
      shown.c_str(), static_cast<long long>(r.param_count), t.tp, t.pp, t.dp,
      t.ep > 1 ? cat(" x ep ", t.ep).c_str() : "", t.zero ? " ZeRO-1" : "",
      t.sp && t.tp > 1 ? " SP" : "",
      t.recompute != "none" ? cat(" recompute ", t.recompute).c_str() : "", t.dtype.c_str(),
      r.threads);
  if (t.pp > 1) std::printf("  pipeline            %s\n", r.schedule_name.c_str());
  std::printf("  cpu                 %s, %d hardware threads, simd %s\n", cpu_name().c_str(),
              ThreadPool::hardware_threads(), kernels::simd_name(kernels::simd_level()).c_str());
  std::printf("  batch               %lld sequences x %lld tokens per step (micro-batch %lld)\n",
              static_cast<long long>(t.global_batch), static_cast<long long>(t.seq_len),
              static_cast<long long>(t.micro_batch));
  std::printf("  tokens/s            %10.1f   (%lld steps after %lld warm-up, %.2f s)\n", tps,
              static_cast<long long>(measured), static_cast<long long>(o.warmup), secs);
  std::printf("  ms/step             %10.1f\n", 1e3 * secs / std::max<int64_t>(measured, 1));
  std::printf("  FLOP/token          %10.3e   (6 x %lld params + 12 x L %lld x H %lld x S %lld)\n",
              flops_per_token, static_cast<long long>(r.param_count),
              static_cast<long long>(config.num_hidden_layers),
              static_cast<long long>(config.q_dim()), static_cast<long long>(t.seq_len));
  std::printf("  GFLOP/s             %10.2f   (%.2f per thread)\n", tps * flops_per_token / 1e9,
              tps * flops_per_token / 1e9 / (r.threads * t.tp * t.pp * t.dp * t.ep));
  std::printf("  optimizer bytes     %10.1f MB per rank (values, grads, m, v)\n",
              r.optimizer_bytes.empty() ? 0.0 : r.optimizer_bytes[0] / 1e6);
  if (t.pp > 1) {
    std::fflush(stdout);
    train::print_pipeline_stats(r, std::cout);
  }
  return 0;
}

[[maybe_unused]] const bool registered = register_command(
    {"bench train", "Training tokens/s and FLOP rate on random data", [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       o->t.seq_len = 256;
       o->t.micro_batch = 4;
       o->t.global_batch = 0;
       app.add_option("--model", o->t.model, "A model directory to train (its weights as start)");
       app.add_option("--init", o->t.init,
                      "A shape: bench-30m (default, ~34M parameters), small, tiny, "
                      "tinyllama-1.1b, or a config.json");
       app.add_option("--seq-len", o->t.seq_len, "Tokens per sequence (default 256)")
           ->check(CLI::PositiveNumber);
       app.add_option("--micro-batch-size", o->t.micro_batch, "Sequences per micro-batch (4)")
           ->check(CLI::PositiveNumber);
       app.add_option("--global-batch-size", o->t.global_batch,
                      "Sequences per step (default micro-batch-size x dp, x 2 pp with --pp > 1)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--steps", o->measure_steps, "Measured steps (default 4)")
           ->check(CLI::PositiveNumber);
       app.add_option("--warmup", o->warmup, "Steps run before measuring (default 1)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--threads", o->t.threads, "Threads per rank (default: cores / ranks)")
           ->check(CLI::NonNegativeNumber);
       app.add_option("--tp", o->t.tp, "Tensor-parallel ranks")->check(CLI::PositiveNumber);
       app.add_option("--dp", o->t.dp, "Data-parallel replicas")->check(CLI::PositiveNumber);
       add_pipeline_flags(app, o->t);
       app.add_option("--zero", o->t.zero, "1: ZeRO-1")->check(CLI::IsMember({0, 1}));
       app.add_option("--dtype", o->t.dtype, "f32 or bf16 compute")
           ->check(CLI::IsMember({"f32", "bf16"}));
       app.add_option("--seed", o->t.seed, "Seed of the weights and the random data");
       app.add_option("--bucket-mb", o->t.bucket_mb,
                      "DP gradient bucket size in MB (default 25, as train)")
           ->check(CLI::PositiveNumber);
       app.add_flag("--no-overlap", o->no_overlap,
                    "Reduce the DP gradient buckets only after the backward (default: during it)");
       app.add_option("--backend", o->t.backend, "auto, local, mpi")
           ->check(CLI::IsMember({"auto", "local", "mpi"}));
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
