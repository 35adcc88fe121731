// What the planner is asked about: a layout of the ranks and a workload (inference or training).
#pragma once

#include <cstdint>
#include <string>

#include "parallm/parallel/train_mode.h"
#include "parallm/pipeline/schedule.h"
#include "parallm/plan/hardware.h"

namespace parallm::plan {

// Ranks as in DESIGN.md: TP fastest, then DP, then PP (global = tp + dp*TP + pp*TP*DP). Expert
// parallelism is carved out of DP as in Megatron-LM and DeepSpeed-MoE: ep ranks of one DP group
// share the dense weights and split the experts, so ep divides dp.
//
// `experts_over_tp`: vLLM's --enable-expert-parallel (inference, MoE, ep 1): each stage's TP ranks
// split attention and the LM head as for a dense model and hold whole experts (E / TP each), the
// TP group being the EP group; one all-reduce per MoE layer replaces the all-to-all.
struct Layout {
  int tp = 1, pp = 1, dp = 1, ep = 1;
  bool experts_over_tp = false;
  int world() const { return tp * pp * dp; }
  int global_rank(int t, int d, int p) const { return t + d * tp + p * tp * dp; }
  std::string str() const;  // "tp=4 pp=1 dp=1 ep=1"; experts over TP: "tp=4 pp=1 dp=1 ep=tp"
  // The flags that run it: "--tp 4 --enable-expert-parallel", "--pp 2 --ep 2" (generate's), "--dp
  // 2" (serve's replicas); "" for one rank. The engine's --ep takes no replicas beside it (dp !=
  // ep): those layouts have no flags, "".
  std::string engine_flags() const;
  bool operator==(const Layout&) const = default;
};

struct InferenceWorkload {
  int64_t batch = 1;         // sequences decoded together, over all DP replicas
  int64_t prompt_len = 512;  // tokens of each prompt
  int64_t output_len = 128;  // tokens generated per sequence
  Precision weights = Precision::FP16;
  Precision kv_cache = Precision::FP16;
  Precision activations = Precision::FP16;  // also what TP/PP messages carry
};

// The recomputation modes are the trainer's own (parallel/train_mode.h).
using parallel::parse_recompute;
using parallel::Recompute;
using parallel::recompute_name;

enum class Optimizer { Adam, SGD };
Optimizer parse_optimizer(std::string_view s, std::string_view flag);

struct TrainingWorkload {
  int64_t global_batch = 512;  // sequences per optimizer step
  int64_t micro_batch = 1;     // sequences per micro-batch
  int64_t seq_len = 4096;
  Optimizer optimizer = Optimizer::Adam;
  Recompute recompute = Recompute::Selective;
  bool sequence_parallel = true;  // only meaningful with tp > 1
  int zero = 0;  // ZeRO stage: 1 shards optimizer states over DP, 2 also gradients, 3 also weights
  pipeline::ScheduleKind schedule = pipeline::ScheduleKind::OneFOneB;
  int chunks = 1;  // model chunks per stage (interleaved)
  // DP gradient buckets (the engine's --bucket-mb, PyTorch DDP's 25 MB): without ZeRO each bucket
  // is all-reduced as soon as the last micro-batch's backward has produced it, while the backward
  // goes on (overlap_grad_reduce); only what is left when the backward ends adds to the step.
  double bucket_bytes = 25e6;
  bool overlap_grad_reduce = true;
  // FP32: parallm's own training engine: f32 weights, gradients and activations (TP/PP messages
  // too), Adam's m and v in f32 (4 + 4 + 8 bytes per parameter). BF16 or FP16: mixed precision as
  // in Megatron-LM and ZeRO: 16-bit weights, gradients and activations, f32 master weights and
  // Adam moments (2 + 2 + 12). The activation count is the engine's either way
  // (activation_bytes_per_chunk), at this precision's bytes per value.
  Precision precision = Precision::BF16;
};

}  // namespace parallm::plan
