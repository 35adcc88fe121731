// Flags shared by every command that runs a model (generate, bench decode, bench prefill).
#pragma once

#include <CLI/CLI.hpp>

#include "parallm/engine/runtime.h"

namespace parallm::cli {

inline void add_engine_flags(CLI::App& app, EngineOptions& o) {
  app.add_option("--model", o.model,
                 "Model: a Hugging Face directory (config.json + safetensors), a .safetensors "
                 "file, or a llama2.c .bin checkpoint")
      ->required();
  app.add_option("--tp", o.tp, "Tensor-parallel ranks (threads here, or processes under mpirun)")
      ->check(CLI::PositiveNumber);
  app.add_option("--pp", o.pp, "Pipeline stages (each a --tp group); world size = tp x pp")
      ->check(CLI::PositiveNumber);
  app.add_option("--pp-layers", o.pp_layers, "Layers per stage, e.g. 6,5,5,6 (default: even)")
      ->delimiter(',');
  app.add_option("--trace", o.trace_file, "Write a Chrome trace-event JSON timeline of every rank");
  app.add_option("--threads", o.threads,
                 "Threads per rank (default: cores / ranks in this process)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--dtype", o.dtype, "Weight dtype: auto (the checkpoint's), f32, bf16, f16")
      ->check(CLI::IsMember({"auto", "f32", "bf16", "f16"}));
  app.add_option("--backend", o.backend,
                 "Comm backend: auto (mpi under mpirun, else local), local, mpi")
      ->check(CLI::IsMember({"auto", "local", "mpi"}));
  app.add_option("--comm-timeout", o.comm_timeout_s,
                 "Seconds a blocking collective waits before failing (default 300)")
      ->check(CLI::PositiveNumber);
  app.add_flag("--comm-stats", o.comm_stats, "Print calls, bytes and time per collective at exit");
  app.add_flag("--mem-stats", o.mem_stats, "Print each rank's weight bytes and resident memory");
}

}  // namespace parallm::cli
