#include "parallm/engine/runtime.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/trace.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/pipeline/partition.h"

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
void check_pp_split(const std::string& mode) {
  if (mode != "auto" && mode != "on" && mode != "off")
    fail("cli", "--pp-split: '", mode, "' is not one of auto, on, off");
}
}  // namespace

bool resolve_pp_split(const std::string& mode, const comm::Group& world, const comm::Mesh& mesh) {
  check_pp_split(mode);
  const comm::Group& stage = mesh.tp_ep();
  if (mode == "off" || stage.size() == 1 || mesh.pp().size() == 1) return false;
  if (mode == "on") return true;
  // Every stage's group on one machine, and some pipeline crossing machines: agreed by all ranks
  // (a max over the world of "mine is not" and "mine does").
  float v[2] = {stage.on_one_machine() ? 0.f : 1.f, mesh.pp().on_one_machine() ? 0.f : 1.f};
  world.all_reduce(v, 2, comm::ReduceOp::Max);
  return v[0] == 0.f && v[1] == 1.f;
}

void run_model(const EngineOptions& options, const std::function<void(RankContext&)>& fn) {
  if (options.tp < 1) fail("cli", "--tp must be >= 1, got ", options.tp);
  if (options.pp < 1) fail("cli", "--pp must be >= 1, got ", options.pp);
  if (options.ep < 1) fail("cli", "--ep must be >= 1, got ", options.ep);
  if (options.dp < 1) fail("cli", "--data-parallel-size must be >= 1, got ", options.dp);
  if (options.dp > 1 && options.ep > 1)
    fail("cli", "--data-parallel-size ", options.dp, " with --ep ", options.ep,
         " is not supported (EP ranks take the mesh's DP dimension)");
  if (options.threads < 0) fail("cli", "--threads must be >= 0, got ", options.threads);
  ModelConfig config;
  std::unique_ptr<WeightSource> source = open_model(options.model, &config);
  const DType dtype = resolve_weight_dtype(options.dtype, config);
  // --enable-expert-parallel: before the heads' check, so TP above the experts says so.
  if (options.enable_expert_parallel) {
    const std::string why = llama_expert_parallel_problem(config, options.tp, options.ep);
    if (!why.empty()) fail("cli", why);
  }
  // Fail before launching anything when the layout cannot fit the heads.
  parallel::HeadPlan::make(config.num_attention_heads, config.num_key_value_heads, options.tp, 0);
  const std::vector<pipeline::StageLayers> stages =
      pipeline::partition_layers(config.num_hidden_layers, options.pp, options.pp_layers);
  // A missing or misshapen tensor is one line here, before any rank starts.
  check_llama_weights(*source, config);
  // --ep: fail before launching when the experts cannot be split so.
  if (options.ep > 1) {
    const std::string why = parallel::moe_ep_problem(config.num_local_experts, options.ep);
    if (!why.empty()) fail("cli", why);
  }
  const int world_size = options.tp * options.pp * options.ep * options.dp;
  check_pp_split(options.pp_split);  // before any rank starts

  comm::LaunchOptions launch;
  launch.backend = options.backend;
  launch.timeout_s = options.comm_timeout_s;
  launch.print_stats = options.comm_stats;
  const int ranks_here = comm::ranks_on_this_node(world_size);
  const int threads = options.threads > 0
                          ? options.threads
                          : std::max(1, ThreadPool::hardware_threads() / ranks_here);
  std::mutex print_mu;
  comm::launch(world_size, launch, [&](comm::Group world) {
    ThreadPool pool(threads);
    ScopedPool scoped(pool);
    TraceBuffer trace(world.rank());
    if (!options.trace_file.empty()) set_thread_trace(&trace);
    // EP ranks are the mesh's DP ranks, one EP block (docs/moe.md): rank = tp + ep*TP + pp*TP*EP.
    // With dp > 1 (serving replicas) the DP dimension holds the replicas instead.
    comm::Mesh mesh(world, options.dp > 1 ? comm::MeshShape{options.tp, options.pp, options.dp, 1}
                                          : comm::MeshShape{options.tp, options.pp, options.ep,
                                                            options.ep});
    comm::Group tp = mesh.tp();
    LlamaOptions lo;
    lo.ep = mesh.ep();
    lo.experts_over_tp = options.enable_expert_parallel;
    lo.weight_dtype = dtype;
    lo.layer_begin = stages[mesh.pp_rank()].begin;
    lo.layer_end = stages[mesh.pp_rank()].end;
    LlamaModel model(config, *source, tp, lo);
    if (options.mem_stats) {
      std::lock_guard<std::mutex> lock(print_mu);
      std::fprintf(stderr,
                   "[mem] rank %d/%d (tp %d, stage %d: layers %lld-%lld): weights %.2f MiB (%llu "
                   "bytes; full model %.2f MiB in %s), process RSS %.2f MiB\n",
                   world.rank(), world.size(), mesh.tp_rank(), mesh.pp_rank(),
                   static_cast<long long>(lo.layer_begin), static_cast<long long>(lo.layer_end - 1),
                   model.weight_bytes() / 1048576.0,
                   static_cast<unsigned long long>(model.weight_bytes()),
                   config.param_count() * static_cast<double>(dtype_size(dtype)) / 1048576.0,
                   std::string(dtype_name(dtype)).c_str(), resident_bytes() / 1048576.0);
    }
    RankContext ctx{world, tp, mesh, config, model};
    ctx.split_pp_hops = resolve_pp_split(options.pp_split, world, mesh);
    fn(ctx);
    if (!options.trace_file.empty()) {
      set_thread_trace(nullptr);
      // Rank 0 collects every rank's events and writes one file.
      const std::vector<std::string> all = comm::gather_strings(world, trace.to_json_events(), 0);
      if (world.rank() == 0) write_trace_file(options.trace_file, all);
    }
  });
}

}  // namespace parallm
