#include "parallm/train/trainer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"
#include "parallm/model/init_model.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/tokenizer.h"
#include "parallm/model/weights.h"
#include "parallm/train/checkpoint.h"
#include "parallm/train/dp.h"
#include "parallm/train/model.h"
#include "parallm/train/params.h"

namespace fs = std::filesystem;

namespace parallm::train {
namespace {

std::atomic<int> g_stop{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free flag");

// The sum over `g` of each rank's double, exact and the same on every rank: the values are
// gathered as their bits (all_gather carries I64 unchanged) and summed in rank order.
double sum_over(const comm::Group& g, double x) {
  if (g.size() == 1) return x;
  std::vector<double> all(static_cast<size_t>(g.size()));
  g.all_gather(&x, all.data(), 1, DType::I64);
  double s = 0;
  for (double v : all) s += v;
  return s;
}

std::string canonical_or_empty(const std::string& path) {
  if (path.empty()) return "";
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::path(path), ec);
  if (ec) return fs::absolute(path).lexically_normal().string();
  std::string s = p.string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

// The directory a model path names (a file's parent), for finding the tokenizer beside it.
std::string model_dir(const std::string& model) {
  if (model.empty()) return "";
  return fs::is_directory(model) ? model : fs::path(model).parent_path().string();
}

// The tokenizer files a checkpoint copies: --tokenizer, else the ones beside the model.
std::vector<std::string> tokenizer_files(const TrainOptions& o) {
  if (!o.tokenizer.empty()) return {o.tokenizer};
  std::vector<std::string> out;
  const std::string dir = model_dir(!o.model.empty() ? o.model : o.resume);
  if (dir.empty()) return out;
  for (const char* name : {"tokenizer.json", "tokenizer.model"})
    if (fs::is_regular_file(fs::path(dir) / name)) out.push_back((fs::path(dir) / name).string());
  return out;
}

std::unique_ptr<Tokenizer> find_tokenizer(const TrainOptions& o) {
  if (!o.tokenizer.empty()) return load_tokenizer_file(o.tokenizer);
  if (!o.model.empty()) return load_tokenizer(o.model);
  if (!o.resume.empty()) return load_tokenizer(o.resume);
  return nullptr;
}

nlohmann::json options_json(const TrainOptions& o) {
  nlohmann::json j;
  j["seq_len"] = o.seq_len;
  j["global_batch_size"] = o.global_batch;
  j["micro_batch_size"] = o.micro_batch;
  j["steps"] = o.steps;
  j["lr"] = o.adamw.lr;
  j["min_lr"] = o.adamw.min_lr;
  j["warmup_steps"] = o.adamw.warmup_steps;
  j["lr_schedule"] = o.adamw.schedule;
  j["beta1"] = o.adamw.beta1;
  j["beta2"] = o.adamw.beta2;
  j["eps"] = o.adamw.eps;
  j["weight_decay"] = o.adamw.weight_decay;
  j["grad_clip"] = o.adamw.grad_clip;
  j["seed"] = o.seed;
  j["shuffle"] = o.shuffle;
  j["data"] = o.data;
  j["dtype"] = o.dtype;
  j["tp"] = o.tp;
  j["dp"] = o.dp;
  j["zero"] = o.zero;
  return j;
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) s = 0;
  const long t = static_cast<long>(s + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  return buf;
}

void check_options(const TrainOptions& o) {
  auto positive = [](int64_t v, const char* flag) {
    if (v < 1) fail("train", flag, " must be >= 1, got ", v);
  };
  positive(o.tp, "--tp");
  positive(o.dp, "--dp");
  positive(o.seq_len, "--seq-len");
  positive(o.micro_batch, "--micro-batch-size");
  positive(o.global_batch, "--global-batch-size");
  positive(o.steps, "--steps");
  positive(o.eval_batches, "--eval-batches");
  if (o.zero != 0 && o.zero != 1) fail("train", "--zero must be 0 or 1, got ", o.zero);
  if (o.threads < 0) fail("train", "--threads must be >= 0, got ", o.threads);
  if (o.save_every < 0) fail("train", "--save-every must be >= 0, got ", o.save_every);
  if (o.stop_after < 0) fail("train", "--stop-after must be >= 0, got ", o.stop_after);
  if (o.eval_every < 0) fail("train", "--eval-every must be >= 0, got ", o.eval_every);
  if (o.save_every > 0 && o.save.empty()) fail("train", "--save-every needs --save DIR");
  if (o.eval_every > 0 && o.val_data.empty() && !o.val_ids)
    fail("train", "--eval-every needs --val-data FILE");
  if (o.bucket_mb < 1 && o.bucket_bytes <= 0)
    fail("train", "--bucket-mb must be >= 1, got ", o.bucket_mb);
  if (o.dtype != "f32" && o.dtype != "bf16")
    fail("train", "--dtype must be f32 or bf16, got \"", o.dtype, "\"");
  AdamWConfig a = o.adamw;
  a.steps = o.steps;
  check_config(a);  // the optimizer's flags, named
  parse_token_file_type(o.data_dtype, "--data-dtype");
}

TokenData load_data(const std::string& path, const std::string& flag, const TrainOptions& o,
                    const ModelConfig& config) {
  const TokenFileType type = parse_token_file_type(o.data_dtype, "--data-dtype");
  std::unique_ptr<Tokenizer> tok;
  if (fs::path(path).extension() != ".bin") {
    tok = find_tokenizer(o);
    if (!tok)
      fail("train", flag, " ", path,
           " is text (its name does not end in .bin), but there is no tokenizer: give "
           "--tokenizer FILE, or a token file");
  }
  // Text is encoded line by line on the current pool: use the machine's cores.
  ThreadPool pool(ThreadPool::hardware_threads());
  ScopedPool scoped(pool);
  return TokenData::from_file(path, type, tok.get(), config.vocab_size);
}

}  // namespace

void request_training_stop() { g_stop.store(1, std::memory_order_relaxed); }
void clear_training_stop() { g_stop.store(0, std::memory_order_relaxed); }

ModelConfig resolve_config(const TrainOptions& o) {
  const int given = !o.model.empty() + !o.init.empty();
  if (given > 1) fail("train", "give one of --model DIR and --init SHAPE, not both");
  if (given == 0 && o.resume.empty())
    fail("train", "give --model DIR or --init SHAPE|config.json (or --resume DIR)");
  ModelConfig config;
  if (!o.model.empty()) {
    open_model(o.model, &config);
  } else if (!o.init.empty()) {
    config = fs::path(o.init).extension() == ".json" ? ModelConfig::from_file(o.init)
                                                      : shape_preset(o.init);
    if (!o.tokenizer.empty()) {
      // The vocabulary is the tokenizer's, so the checkpoint generates text with it.
      const std::unique_ptr<Tokenizer> tok = load_tokenizer_file(o.tokenizer);
      config.vocab_size = tok->vocab_size();
      if (tok->bos_id() >= 0) config.bos_token_id = tok->bos_id();
      if (tok->eos_id() >= 0) config.eos_token_ids = {tok->eos_id()};
    }
    config.torch_dtype = "float32";
    config.validate(o.init);
  }
  if (!o.resume.empty()) {
    const CheckpointInfo info = read_checkpoint_info(o.resume);
    if (given == 0) {
      config = info.config;
    } else if (std::string diff = config_difference(config, info.config); !diff.empty()) {
      fail("train", "--resume ", o.resume, " is a checkpoint of another model: ", diff);
    }
  }
  if (std::string why = llama_tp_problem(config, o.tp); !why.empty())
    fail("train", "--tp ", o.tp, " does not fit the model: ", why);
  if (config.is_moe()) fail("train", "mixture-of-experts models cannot be trained yet");
  return config;
}

TrainResult run_training(const TrainOptions& o, std::ostream* progress) {
  std::ostream& out = progress ? *progress : std::cerr;
  check_options(o);
  BatchOrder order;
  order.seq_len = o.seq_len;
  order.global_batch = o.global_batch;
  order.micro_batch = o.micro_batch;
  order.dp = o.dp;
  order.shuffle = o.shuffle;
  order.seed = o.seed;
  order.check();
  const ModelConfig config = resolve_config(o);
  if (o.seq_len > config.max_position_embeddings)
    fail("train", "--seq-len ", o.seq_len, " exceeds the model's max_position_embeddings ",
         config.max_position_embeddings);
  if (!o.tokenizer.empty()) {
    const std::unique_ptr<Tokenizer> tok = load_tokenizer_file(o.tokenizer);
    if (tok->vocab_size() > config.vocab_size)
      fail("train", "--tokenizer ", o.tokenizer, " has ", tok->vocab_size(),
           " tokens but the model's vocab_size is ", config.vocab_size);
  }
  // Where the run starts.
  int64_t start = 0;
  if (!o.resume.empty()) {
    const CheckpointInfo info = read_checkpoint_info(o.resume);
    start = info.step;
    if (start >= o.steps)
      fail("train", "--resume ", o.resume, " is at step ", start, "; --steps ", o.steps,
           " leaves nothing to do");
    const nlohmann::json now = options_json(o);
    for (const char* k : {"seq_len", "global_batch_size", "shuffle", "seed", "data"})
      if (info.options.contains(k) && info.options[k] != now[k])
        out << "[train] note: --resume: " << k << " was " << info.options[k].dump() << ", now "
            << now[k].dump() << " (the data order differs from the interrupted run)\n";
  }
  // Never write over the model the run starts from, nor over something that is not a checkpoint.
  if (!o.save.empty()) {
    const std::string save = canonical_or_empty(o.save);
    if (!o.model.empty() && (save == canonical_or_empty(o.model) ||
                             save == canonical_or_empty(model_dir(o.model))))
      fail("train", "--save ", o.save, " is the --model directory; save elsewhere");
    if (!o.resume.empty() && save == canonical_or_empty(o.resume))
      fail("train", "--save ", o.save, " is the --resume directory; save elsewhere");
    check_save_target(o.save, "--save");
  }
  // The data, checked whole before any rank starts.
  std::shared_ptr<const TokenData> data = o.data_ids, val = o.val_ids;
  if (!data) {
    if (o.data.empty()) fail("train", "--data FILE is required");
    data = std::make_shared<TokenData>(load_data(o.data, "--data", o, config));
  }
  const int64_t sequences = data->sequences(o.seq_len);
  if (!val && !o.val_data.empty())
    val = std::make_shared<TokenData>(load_data(o.val_data, "--val-data", o, config));
  const int64_t val_sequences = val ? val->sequences(o.seq_len) : 0;
  for (const auto* d : {data.get(), val.get()})
    if (d)
      for (int32_t id : d->ids())
        if (id < 0 || id >= config.vocab_size)
          fail("train", "token id ", id, " in the data is outside the vocabulary [0, ",
               config.vocab_size, ")");
  std::ofstream log;
  if (!o.log_json.empty() && comm::launched_rank() == 0) {
    log.open(o.log_json, start > 0 ? std::ios::app : std::ios::trunc);
    if (!log) fail<std::runtime_error>("train", "--log-json ", o.log_json, ": cannot open");
  }

  const int world_size = o.tp * o.dp;
  comm::LaunchOptions lo;
  lo.backend = o.backend;
  lo.timeout_s = o.comm_timeout_s;
  const int threads = o.threads > 0 ? o.threads
                                    : std::max(1, ThreadPool::hardware_threads() /
                                                      comm::ranks_on_this_node(world_size));
  const int64_t bucket_bytes = o.bucket_bytes > 0 ? o.bucket_bytes : o.bucket_mb * 1000000;
  const std::vector<std::string> tok_files = tokenizer_files(o);
  const int64_t G = o.global_batch, S = o.seq_len, M = o.micro_batch;
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(G * S));
  AdamWConfig adamw = o.adamw;
  adamw.steps = o.steps;

  TrainResult result;
  result.config = config;
  result.param_count = config.param_count();
  result.threads = threads;
  if (!o.quiet && comm::launched_rank() == 0)
    out << "[train] " << config.param_count() << " parameters, " << config.num_hidden_layers
        << " layers, hidden " << config.hidden_size << "; tp " << o.tp << " x dp " << o.dp
        << (o.zero ? " (ZeRO-1)" : "") << ", " << threads << " threads per rank; " << sequences
        << " sequences of " << S << " tokens, " << G << " per step (" << order.micro_batches()
        << " micro-batches of " << M << " per DP rank)" << (start > 0 ? "; resuming at step " : "")
        << (start > 0 ? std::to_string(start) : "") << std::endl;

  std::mutex mu;
  comm::launch(world_size, lo, [&](comm::Group world) {
    ThreadPool pool(threads);
    ScopedPool scoped(pool);
    comm::Mesh mesh(world, {o.tp, 1, o.dp, 1});
    const int tp_rank = mesh.tp_rank(), dp_rank = mesh.dp_rank();
    const bool root = world.rank() == 0;
    ParamStore params(config, o.tp, tp_rank);
    if (o.resume.empty()) {
      if (!o.model.empty()) {
        ModelConfig c;
        params.load(*open_model(o.model, &c));
      } else {
        init_params(params, config, o.seed);
      }
    }
    DataParallel dp(params.params(), params.size(), params.values(), params.grads(), mesh.dp(),
                    {bucket_bytes, o.zero == 1, o.overlap});
    if (!o.resume.empty()) load_checkpoint(o.resume, config, params, dp, o.tp, tp_rank);
    TrainModelOptions mo;
    mo.compute = o.dtype == "bf16" ? DType::BF16 : DType::F32;
    mo.threads = threads;
    TrainModel model(config, params, mesh.tp(), mo);
    model.refresh_compute_weights();
    model.set_grad_ready_hook([&dp](const Param& p) { dp.grad_ready(p); });

    // What every rank holds, measured from its allocations.
    {
      const int64_t mine[3] = {static_cast<int64_t>(dp.optimizer_bytes()), dp.param_numel(),
                               dp.state_size()};
      std::vector<int64_t> all(3 * static_cast<size_t>(world.size()));
      world.all_gather(mine, all.data(), 3, DType::I64);
      if (root) {
        std::lock_guard<std::mutex> lock(mu);
        for (int r = 0; r < world.size(); ++r) {
          result.optimizer_bytes.push_back(static_cast<uint64_t>(all[3 * r]));
          result.param_numel.push_back(all[3 * r + 1]);
          result.state_numel.push_back(all[3 * r + 2]);
        }
        if (!o.quiet)
          out << "[train] memory per rank: " << all[0] / 1e6 << " MB for values, grads, m and v ("
              << static_cast<double>(all[0]) / static_cast<double>(std::max<int64_t>(all[1], 1))
              << " bytes per parameter); " << dp.buckets().size() << " DP bucket"
              << (dp.buckets().size() == 1 ? "" : "s") << std::endl;
      }
    }
    CheckpointInfo state;
    state.options = options_json(o);
    auto save = [&](int64_t step) {
      state.step = step;
      Timer t;
      save_checkpoint(o.save, config, params, dp, mesh, state, tok_files);
      if (root && !o.quiet)
        out << "[train] saved " << o.save << " at step " << step << " in "
            << static_cast<int>(t.millis()) << " ms" << std::endl;
    };
    const int64_t nm = order.micro_batches();
    std::vector<int32_t> inputs(static_cast<size_t>(M * S)), targets(inputs.size());
    auto evaluate = [&]() {
      BatchOrder vo = order;
      vo.shuffle = false;
      double sum = 0;
      for (int64_t e = 0; e < o.eval_batches; ++e)
        for (int64_t micro = 0; micro < nm; ++micro) {
          fill_micro_batch(*val, vo, e, dp_rank, micro, inputs.data(), targets.data());
          sum += model.loss(inputs.data(), targets.data(), M, S);
        }
      return dp.sum_over_dp(sum) / static_cast<double>(o.eval_batches * G * S);
    };
    (void)val_sequences;
    world.barrier();  // the ranks start their clocks together
    Timer run_clock;
    int64_t end = o.stop_after > 0 ? std::min(o.stop_after, o.steps) : o.steps;
    for (int64_t step = start; step < end; ++step) {
      Timer t;
      params.zero_grads();
      double loss_sum = 0;
      for (int64_t micro = 0; micro < nm; ++micro) {
        fill_micro_batch(*data, order, step, dp_rank, micro, inputs.data(), targets.data());
        // Only the last micro-batch's gradients are final: its backward starts the buckets.
        if (micro == nm - 1) dp.begin_sync();
        loss_sum += model.forward_backward(inputs.data(), targets.data(), M, S, grad_scale);
      }
      dp.finish_sync();
      const double loss = dp.sum_over_dp(loss_sum) / static_cast<double>(G * S);
      // The global norm: each sharded slice once, TP-replicated tensors once (Param::counts_once:
      // norms on TP rank 0, a replicated KV head on the first of its replicas), and with ZeRO
      // each rank's reduced shard once over DP.
      double sq = sum_over(mesh.tp(), dp.local_grad_sq(tp_rank));
      if (dp.zero()) sq = dp.sum_over_dp(sq);
      const double norm = std::sqrt(sq);
      const double lr = learning_rate(adamw, step);
      dp.step(adamw, lr, step + 1, static_cast<float>(clip_factor(adamw.grad_clip, norm)));
      model.refresh_compute_weights();
      StepRecord rec;
      rec.step = step + 1;
      rec.loss = loss;
      rec.lr = lr;
      rec.grad_norm = norm;
      rec.seconds = t.seconds();
      rec.tokens_per_s = static_cast<double>(G * S) / std::max(rec.seconds, 1e-9);
      if (val && o.eval_every > 0 && (step + 1) % o.eval_every == 0) rec.val_loss = evaluate();
      if (root) {
        std::lock_guard<std::mutex> lock(mu);
        result.steps.push_back(rec);
        const double per_step = run_clock.seconds() / static_cast<double>(step + 1 - start);
        if (!o.quiet) {
          char line[256];
          std::snprintf(line, sizeof(line),
                        "[train] step %lld/%lld | loss %.4f | lr %.3e | grad norm %.4f | %.0f "
                        "tok/s | %s left",
                        static_cast<long long>(step + 1), static_cast<long long>(o.steps), loss, lr,
                        norm, rec.tokens_per_s,
                        format_duration(per_step * static_cast<double>(o.steps - step - 1)).c_str());
          out << line;
          if (rec.val_loss >= 0) out << " | val loss " << rec.val_loss;
          out << std::endl;
        }
        if (log.is_open()) {
          nlohmann::json j;
          j["step"] = rec.step;
          j["loss"] = rec.loss;
          j["lr"] = rec.lr;
          j["grad_norm"] = rec.grad_norm;
          j["tokens_per_s"] = rec.tokens_per_s;
          if (rec.val_loss >= 0) j["val_loss"] = rec.val_loss;
          log << j.dump() << "\n";
          log.flush();
        }
      }
      // A stop request (a signal) reaches the ranks at different moments: they agree on it here.
      float stop = g_stop.load(std::memory_order_relaxed) ? 1.0f : 0.0f;
      world.all_reduce(&stop, 1, comm::ReduceOp::Max);
      if (stop > 0 && step + 1 < end) {
        end = step + 1;
        if (root) {
          std::lock_guard<std::mutex> lock(mu);
          result.stopped = true;
        }
        break;
      }
      if (!o.save.empty() && o.save_every > 0 && (step + 1) % o.save_every == 0 &&
          step + 1 < end)
        save(step + 1);
    }
    if (root) {
      std::lock_guard<std::mutex> lock(mu);
      result.seconds = run_clock.seconds();
      if (!o.quiet && o.dp > 1)
        out << "[train] last step: " << dp.early_buckets() << " of " << dp.buckets().size()
            << " DP buckets reduced while the backward ran" << std::endl;
    }
    if (!o.save.empty()) save(end);
  });
  return result;
}

}  // namespace parallm::train
