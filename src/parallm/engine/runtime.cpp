#include "parallm/engine/runtime.h"

#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"

namespace parallm {

DType resolve_weight_dtype(const std::string& flag, const ModelConfig& config) {
  if (flag != "auto") return parse_dtype(flag, "--dtype");
  if (config.torch_dtype == "float32") return DType::F32;
  if (config.torch_dtype == "float16") return DType::F16;
  return DType::BF16;
}

uint64_t resident_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream s(line.substr(6));
      uint64_t kb = 0;
      s >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

namespace {

// Ranks that mpirun put on this machine (they share its cores), from the launcher's environment.
int local_mpi_ranks() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"}) {
    if (const char* v = std::getenv(var)) {
      const int n = std::atoi(v);
      if (n > 0) return n;
    }
  }
  return 1;
}

}  // namespace

void run_model(const EngineOptions& options, const std::function<void(RankContext&)>& fn) {
  if (options.tp < 1) fail("cli", "--tp must be >= 1, got ", options.tp);
  if (options.threads < 0) fail("cli", "--threads must be >= 0, got ", options.threads);
  ModelConfig config;
  std::unique_ptr<WeightSource> source = open_model(options.model, &config);
  const DType dtype = resolve_weight_dtype(options.dtype, config);
  // Fail before launching anything when the layout cannot fit the heads.
  parallel::HeadPlan::make(config.num_attention_heads, config.num_key_value_heads, options.tp, 0);

  comm::LaunchOptions launch;
  launch.backend = options.backend;
  launch.timeout_s = options.comm_timeout_s;
  launch.print_stats = options.comm_stats;
  const int ranks_here = comm::under_mpirun() ? local_mpi_ranks() : options.tp;
  const int threads = options.threads > 0
                          ? options.threads
                          : std::max(1, ThreadPool::hardware_threads() / ranks_here);
  std::mutex print_mu;
  comm::launch(options.tp, launch, [&](comm::Group world) {
    ThreadPool pool(threads);
    ScopedPool scoped(pool);
    comm::Mesh mesh(world, {options.tp, 1, 1, 1});
    comm::Group tp = mesh.tp();
    LlamaOptions lo;
    lo.weight_dtype = dtype;
    LlamaModel model(config, *source, tp, lo);
    if (options.mem_stats) {
      std::lock_guard<std::mutex> lock(print_mu);
      std::fprintf(stderr,
                   "[mem] rank %d/%d: weights %.2f MiB (full model %.2f MiB in %s), process RSS "
                   "%.2f MiB\n",
                   world.rank(), world.size(), model.weight_bytes() / 1048576.0,
                   config.param_count() * static_cast<double>(dtype_size(dtype)) / 1048576.0,
                   std::string(dtype_name(dtype)).c_str(), resident_bytes() / 1048576.0);
    }
    tp.barrier();
    RankContext ctx{world, tp, config, model};
    fn(ctx);
  });
}

}  // namespace parallm
