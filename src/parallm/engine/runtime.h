// What every command that runs a model needs: the model path, the layout, threads per rank, the
// weight dtype and the comm backend; and the launch of the ranks with each rank's model loaded.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/comm/mesh.h"
#include "parallm/model/config.h"
#include "parallm/model/llama.h"
#include "parallm/model/weights.h"

namespace parallm {

struct EngineOptions {
  std::string model;               // directory, .safetensors or llama2.c .bin
  int tp = 1;                      // tensor-parallel ranks
  int pp = 1;                      // pipeline stages
  int ep = 1;  // expert-parallel ranks per TP rank (MoE): each stage is TP x EP ranks, attention
               // replicated over EP, experts split over it (docs/moe.md)
  // vLLM's --enable-expert-parallel: each stage's TP ranks split attention and the LM head as for a
  // dense model and hold whole experts (E / TP each), the TP group being the EP group; not with
  // ep > 1 (docs/moe.md, "Composition in the engine").
  bool enable_expert_parallel = false;
  int dp = 1;  // data-parallel replicas (serving): each its own TP x PP ranks; not with ep > 1
  std::vector<int64_t> pp_layers;  // explicit layers per stage (--pp-layers), else even
  std::string trace_file;          // --trace: Chrome trace-event JSON of every rank
  int threads = 0;               // threads per rank; 0: the machine's cores / ranks in this process
  std::string dtype = "auto";    // auto (the checkpoint's torch_dtype), f32, bf16, f16
  std::string backend = "auto";  // auto, local, mpi
  double comm_timeout_s = 300;
  bool comm_stats = false;  // print the per-group collective table at the end
  bool mem_stats = false;   // print per-rank weight bytes and resident memory after loading
  // --pp-split: activations cross between stages in 1/TP blocks, all-gathered by the next stage's
  // TP group (pipeline::StageLink::split_over): "on", "off", or "auto", on where every stage's TP
  // group runs on one machine and the stages do not (the link between machines then carries a
  // micro-batch's rows once, not TP times; the all-gather stays in shared memory).
  std::string pp_split = "auto";
};

// What one rank sees once its shard is loaded.
struct RankContext {
  comm::Group world;
  comm::Group tp;
  const comm::Mesh& mesh;
  const ModelConfig& config;
  LlamaModel& model;
  bool split_pp_hops = false;  // --pp-split resolved for this layout (the same on every rank)
  bool is_root() const { return world.rank() == 0; }
};

// --pp-split for this mesh: "on" (with TP and PP both > 1), "off", or "auto" (see EngineOptions).
// Collective over `world`; every rank gets the same answer. Throws naming the flag otherwise.
bool resolve_pp_split(const std::string& mode, const comm::Group& world, const comm::Mesh& mesh);

// The weight dtype for `flag` ("auto" follows config.torch_dtype: float32 -> f32, else bf16 or
// f16).
DType resolve_weight_dtype(const std::string& flag, const ModelConfig& config);

// Opens the model (reading only its config), launches the ranks (threads, or this process's rank
// under mpirun), loads each rank's shard, and calls fn on every rank. Errors in any rank end all.
// Ranks reach fn as their loading ends: a command that times them together starts with a barrier.
void run_model(const EngineOptions& options, const std::function<void(RankContext&)>& fn);

// This process's resident set size in bytes (VmRSS), 0 where unknown.
uint64_t resident_bytes();

}  // namespace parallm
