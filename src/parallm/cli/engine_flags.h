// Flags shared by every command that runs a model (generate, bench decode, bench prefill).
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "parallm/engine/runtime.h"

namespace parallm::cli {

// Threads per rank, weight dtype, comm backend and timeout: every command that launches ranks
// (add_engine_flags below, serve) spells them the same way.
inline void add_runtime_flags(CLI::App& app, int& threads, std::string& dtype,
                              std::string& backend, double& comm_timeout_s) {
  app.add_option("--threads", threads, "Threads per rank (default: cores / ranks in this process)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--dtype", dtype, "Weight dtype: auto (the checkpoint's), f32, bf16, f16")
      ->check(CLI::IsMember({"auto", "f32", "bf16", "f16"}));
  app.add_option("--backend", backend,
                 "Comm backend: auto (mpi under mpirun, else local), local, mpi")
      ->check(CLI::IsMember({"auto", "local", "mpi"}));
  app.add_option("--comm-timeout", comm_timeout_s,
                 "Seconds a blocking collective waits before failing (default 300)")
      ->check(CLI::PositiveNumber);
}

// How activations cross between pipeline stages under TP (EngineOptions::pp_split).
inline void add_pp_split_flag(CLI::App& app, std::string& pp_split) {
  app.add_option("--pp-split", pp_split,
                 "Activations between stages: each TP rank sends 1/TP of them and the next "
                 "stage all-gathers (on), every TP rank sends all (off), or auto (default): on "
                 "where each stage's TP group is on one machine and the stages are not")
      ->check(CLI::IsMember({"auto", "on", "off"}));
}

inline void add_engine_flags(CLI::App& app, EngineOptions& o) {
  app.add_option("--model", o.model,
                 "Model: a Hugging Face directory (config.json + safetensors), a .safetensors "
                 "file, a .gguf file, or a llama2.c .bin checkpoint")
      ->required();
  app.add_option("--tp", o.tp, "Tensor-parallel ranks (threads here, or processes under mpirun)")
      ->check(CLI::PositiveNumber);
  app.add_option("--pp", o.pp, "Pipeline stages (each a --tp group); world size = tp x pp")
      ->check(CLI::PositiveNumber);
  app.add_option("--pp-layers", o.pp_layers, "Layers per stage, e.g. 6,5,5,6 (default: even)")
      ->delimiter(',');
  app.add_option("--trace", o.trace_file, "Write a Chrome trace-event JSON timeline of every rank");
  add_pp_split_flag(app, o.pp_split);
  add_runtime_flags(app, o.threads, o.dtype, o.backend, o.comm_timeout_s);
  app.add_flag("--comm-stats", o.comm_stats, "Print calls, bytes and time per collective at exit");
  app.add_flag("--mem-stats", o.mem_stats, "Print each rank's weight bytes and resident memory");
}

}  // namespace parallm::cli
