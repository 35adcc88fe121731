// parallm init-model: write a Hugging Face-format model with random weights.
#include "parallm/model/init_model.h"

#include <cstdio>
#include <filesystem>

#include "parallm/cli/command.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"

namespace parallm::cli {
namespace {

struct Options {
  std::string shape, out, dtype = "auto";
  uint64_t seed = 0;
  int64_t layers = 0;  // 0: the shape's
};

int run(const Options& o) {
  ModelConfig config = std::filesystem::path(o.shape).extension() == ".json"
                           ? ModelConfig::from_file(o.shape)
                           : shape_preset(o.shape);
  if (o.layers > 0) {
    config.num_hidden_layers = o.layers;
    config.validate("--layers");
  }
  const DType dtype = o.dtype == "auto"
                          ? (config.torch_dtype == "float32" ? DType::F32 : DType::BF16)
                          : parse_dtype(o.dtype, "--dtype");
  ThreadPool pool(ThreadPool::hardware_threads());
  ScopedPool scoped(pool);
  Timer t;
  init_random_model(config, o.out, o.seed, dtype);
  std::printf("wrote %s: %lld parameters (%s), %d layers, hidden %lld, in %.1f s\n", o.out.c_str(),
              static_cast<long long>(config.param_count()), std::string(dtype_name(dtype)).c_str(),
              static_cast<int>(config.num_hidden_layers),
              static_cast<long long>(config.hidden_size), t.seconds());
  return 0;
}

[[maybe_unused]] const bool registered = register_command(
    {"init-model", "Write a model with random weights (config.json + model.safetensors)",
     [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       app.add_option("--shape", o->shape, shape_preset_names() + ", or a config.json")
           ->required();
       app.add_option("--layers", o->layers,
                      "Keep this many decoder layers of the shape (e.g. a few real-shaped "
                      "mixtral-8x7b layers for benchmarks)")
           ->check(CLI::PositiveNumber);
       app.add_option("--out", o->out, "Output directory")->required();
       app.add_option("--seed", o->seed, "Random seed (default 0)");
       app.add_option("--dtype", o->dtype, "auto (f32 for tiny, bf16 otherwise), f32, bf16, f16")
           ->check(CLI::IsMember({"auto", "f32", "bf16", "f16"}));
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
