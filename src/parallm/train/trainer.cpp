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
#include "parallm/core/trace.h"
#include "parallm/model/init_model.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/tokenizer.h"
#include "parallm/model/weights.h"
#include "parallm/parallel/shard.h"
#include "parallm/pipeline/executor.h"
#include "parallm/pipeline/p2p.h"
#include "parallm/pipeline/partition.h"
#include "parallm/pipeline/schedule.h"
#include "parallm/pipeline/simulator.h"
#include "parallm/plan/memory.h"
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
  j["ep"] = o.ep;
  j["zero"] = o.zero;
  j["pp"] = o.pp;
  j["schedule"] = o.schedule;
  j["virtual_stages"] = o.virtual_stages;
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
  positive(o.ep, "--ep");
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
  // The pipeline's flags (the ones that need the model or the batch: run_training).
  positive(o.pp, "--pp");
  positive(o.virtual_stages, "--virtual-stages");
  parse_recompute(o.recompute, "--recompute");
  const pipeline::ScheduleKind kind = pipeline::parse_schedule_kind(o.schedule, "--schedule");
  if (o.virtual_stages > 1 && kind != pipeline::ScheduleKind::Interleaved)
    fail("train", "--virtual-stages ", o.virtual_stages, " needs --schedule interleaved, got ",
         o.schedule);
  if (o.pp == 1 && kind == pipeline::ScheduleKind::Interleaved)
    fail("train", "--schedule interleaved needs --pp >= 2, got --pp 1");
  if (o.pp == 1 && !o.pp_layers.empty())
    fail("train", "--pp-layers ", join(o.pp_layers, ","), " needs --pp >= 2");
}

// The pipeline of a run with PP > 1: per virtual stage its layers, the schedule and what the
// simulator says of it with unit times.
struct PipelinePlan {
  pipeline::ScheduleKind kind = pipeline::ScheduleKind::OneFOneB;
  int v = 1;
  std::vector<pipeline::StageLayers> virtual_stages;
  pipeline::Schedule schedule;
  pipeline::SimResult sim;
};

PipelinePlan plan_pipeline(const TrainOptions& o, const ModelConfig& config, int64_t m) {
  PipelinePlan plan;
  plan.kind = pipeline::parse_schedule_kind(o.schedule, "--schedule");
  plan.v = o.virtual_stages;
  if (plan.kind == pipeline::ScheduleKind::Interleaved && m % o.pp != 0)
    fail("train", "--schedule interleaved needs the micro-batches per DP rank (",
         "--global-batch-size / (--micro-batch-size x --dp) = ", m, ") to be a multiple of --pp ",
         o.pp);
  const int vs = o.pp * plan.v;
  if (config.num_hidden_layers < vs)
    fail("train", "--pp ", o.pp, plan.v > 1 ? cat(" x --virtual-stages ", plan.v) : "",
         " needs at least ", vs, " layers (one per virtual stage); the model has ",
         config.num_hidden_layers, " layers");
  if (!o.pp_layers.empty() && static_cast<int>(o.pp_layers.size()) != vs)
    fail("train", "--pp-layers ", join(o.pp_layers, ","), " gives ", o.pp_layers.size(),
         " counts; --pp ", o.pp, plan.v > 1 ? cat(" x --virtual-stages ", plan.v) : "", " needs ",
         vs, " (one per virtual stage)");
  plan.virtual_stages = pipeline::partition_layers(config.num_hidden_layers, vs, o.pp_layers);
  if (pipeline::StageLink::kFirstTag + 4 * m * plan.v > 32767)
    fail("train", m, " micro-batches per DP rank x ", plan.v,
         " chunks is past the pipeline's message tags (at most ",
         (32767 - pipeline::StageLink::kFirstTag) / 4, ")");
  plan.schedule = pipeline::make_schedule(plan.kind, o.pp, static_cast<int>(m), plan.v);
  pipeline::validate(plan.schedule);
  plan.sim = pipeline::simulate(plan.schedule);
  return plan;
}

// Per rank, what the pipeline measured (summed over the steps it counts).
struct StageClock {
  double busy = 0, makespan = 0, f = 0, b = 0, w = 0;
  int64_t nf = 0, nb = 0, nw = 0;
};

// Every tensor whole (TP-gathered) as one string: [name length, name, count, floats] each.
std::string pack_tensors(const std::vector<std::pair<std::string, Tensor>>& tensors,
                         const std::string& tied_name, bool rename_tied) {
  std::string out;
  auto put = [&out](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  for (const auto& [name0, t] : tensors) {
    const std::string name = rename_tied && name0 == tied_name ? "tied_copy:" + name0 : name0;
    const int64_t len = static_cast<int64_t>(name.size()), n = t.numel();
    put(&len, sizeof(len));
    put(name.data(), name.size());
    put(&n, sizeof(n));
    put(t.data<float>(), static_cast<size_t>(n) * sizeof(float));
  }
  return out;
}

void unpack_tensors(const std::string& in,
                    std::vector<std::pair<std::string, std::vector<float>>>* out) {
  size_t at = 0;
  auto get = [&](void* p, size_t n) {
    std::copy(in.data() + at, in.data() + at + n, static_cast<char*>(p));
    at += n;
  };
  while (at < in.size()) {
    int64_t len = 0, n = 0;
    get(&len, sizeof(len));
    std::string name(static_cast<size_t>(len), '\0');
    get(name.data(), name.size());
    get(&n, sizeof(n));
    std::vector<float> v(static_cast<size_t>(n));
    get(v.data(), v.size() * sizeof(float));
    out->emplace_back(std::move(name), std::move(v));
  }
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

// Per rank, the fields all-gathered for the stats: stage, layers, busy, makespan, F sum, F count,
// B sum, B count, W sum, W count, peak in flight (chunks), peak activation bytes.
constexpr size_t kStageFields = 12;

// The activation bytes plan's formula (plan::activation_bytes_per_chunk: per held (micro-batch,
// chunk) state) gives stage `stage` of TP rank 0 at its peak: its action list walked, a chunk's
// state held from its Forward to its Backward; ZB-H1's B shrinks it to what W needs
// (plan::weight_grad_bytes_per_chunk), which W releases.
double formula_peak_bytes(const PipelinePlan& pipe, int stage, const ModelConfig& config,
                          const TrainOptions& o, Recompute recompute) {
  const pipeline::Schedule& s = pipe.schedule;
  std::vector<double> bytes(static_cast<size_t>(pipe.v)), keep(bytes.size());
  for (int c = 0; c < pipe.v; ++c) {
    const int g = s.virtual_stage(stage, c);
    plan::ActivationShape a;
    a.micro_batch = o.micro_batch;
    a.seq_len = o.seq_len;
    a.tp = o.tp;
    a.tp_rank = 0;
    a.sequence_parallel = o.sp && o.tp > 1;
    a.recompute = recompute == Recompute::None ? 0 : recompute == Recompute::Selective ? 1 : 2;
    a.layers = pipe.virtual_stages.at(static_cast<size_t>(g)).count();
    a.head = g == s.virtual_stages() - 1;
    bytes[c] = static_cast<double>(plan::activation_bytes_per_chunk(config, a));
    keep[c] = static_cast<double>(plan::weight_grad_bytes_per_chunk(config, a, g == 0));
  }
  double held = 0, peak = 0;
  for (const pipeline::Action& a : s.actions(stage)) {
    if (a.kind == pipeline::ActionKind::Forward) {
      held += bytes[a.chunk];
      peak = std::max(peak, held);
    } else if (a.kind == pipeline::ActionKind::Backward) {
      held -= bytes[a.chunk];
    } else if (a.kind == pipeline::ActionKind::BackwardInput) {
      held += keep[a.chunk] - bytes[a.chunk];  // B keeps what W needs
      peak = std::max(peak, held);
    } else if (a.kind == pipeline::ActionKind::BackwardWeight) {
      held -= keep[a.chunk];
    }
  }
  return peak;
}

void fill_stage_stats(TrainResult& r, const std::vector<double>& all, const comm::Mesh& mesh,
                      const PipelinePlan& pipe, const TrainOptions& o, int64_t m,
                      const ModelConfig& config, Recompute recompute) {
  const int p = o.pp, v = pipe.v;
  double busy_sum = 0, span_max = 0, f = 0, b = 0, w = 0;
  int64_t nf = 0, nb = 0, nw = 0;
  r.stages.clear();
  for (int s = 0; s < p; ++s) {
    const double* x = all.data() + kStageFields * static_cast<size_t>(mesh.global_rank(0, 0, s));
    StageStats st;
    st.stage = s;
    st.layers = static_cast<int64_t>(x[1]);
    st.busy_s = x[2];
    st.makespan_s = x[3];
    st.bubble = x[3] > 0 ? 1.0 - x[2] / x[3] : 0.0;
    st.f_ms = x[5] > 0 ? 1e3 * x[4] / x[5] : 0.0;
    st.b_ms = x[7] > 0 ? 1e3 * x[6] / x[7] : 0.0;
    st.w_ms = x[9] > 0 ? 1e3 * x[8] / x[9] : 0.0;
    st.peak_in_flight_chunks = static_cast<int>(x[10]);
    st.peak_in_flight = x[10] / v;
    st.schedule_in_flight_chunks = pipe.sim.peak_in_flight_chunks.at(static_cast<size_t>(s));
    st.peak_activation_bytes = static_cast<int64_t>(x[11]);
    st.formula_activation_bytes = formula_peak_bytes(pipe, s, config, o, recompute);
    r.stages.push_back(st);
    busy_sum += x[2];
    span_max = std::max(span_max, x[3]);
    f += x[4];
    nf += static_cast<int64_t>(x[5]);
    b += x[6];
    nb += static_cast<int64_t>(x[7]);
    w += x[8];
    nw += static_cast<int64_t>(x[9]);
  }
  r.bubble = span_max > 0 ? 1.0 - busy_sum / (p * span_max) : 0.0;
  // The replay: the simulator's times are per micro-batch through a whole stage (a chunk 1/v);
  // its backward is B + W. The scalar means (over stages) for other p; this p's per stage.
  const double fm = nf > 0 ? f / nf : 1.0, bm = nb > 0 ? b / nb : 2.0, wm = nw > 0 ? w / nw : 0.0;
  const bool split = pipe.kind == pipeline::ScheduleKind::ZeroBubbleH1;
  pipeline::SimOptions mean(v * fm, v * (bm + wm), 0.0, split ? v * wm : -1.0);
  r.bubble_formula = pipeline::bubble_formula(pipe.kind, p, static_cast<int>(m), v, mean);
  pipeline::SimOptions per_stage = mean;
  for (const StageStats& st : r.stages) {
    per_stage.stage_forward.push_back(v * st.f_ms / 1e3);
    per_stage.stage_backward.push_back(v * (st.b_ms + st.w_ms) / 1e3);
    if (split) per_stage.stage_weight.push_back(v * st.w_ms / 1e3);
  }
  r.sim_bubble = pipeline::simulate(pipe.schedule, per_stage).bubble_fraction;
  r.replay.clear();
  for (int q = 2; q <= 8; ++q) {
    if (pipe.kind == pipeline::ScheduleKind::Interleaved && m % q != 0) continue;
    const pipeline::Schedule sq = pipeline::make_schedule(pipe.kind, q, static_cast<int>(m), v);
    r.replay.push_back({q, static_cast<int>(m), pipeline::simulate(sq, mean).bubble_fraction,
                        pipeline::bubble_formula(pipe.kind, q, static_cast<int>(m), v, mean)});
  }
}

}  // namespace

void print_pipeline_stats(const TrainResult& r, std::ostream& out) {
  if (r.stages.empty()) return;
  char line[320];
  out << "[stats] " << r.schedule_name << ": per stage (times over the steps after the first)\n";
  out << "[stats] stage layers   busy s   span s  bubble |   F ms   B ms   W ms | in flight "
         "meas/sched (mb units) | act peak MB  formula MB  ratio\n";
  for (const StageStats& s : r.stages) {
    const double f = s.formula_activation_bytes;
    std::snprintf(line, sizeof(line),
                  "[stats] %5d %6lld %8.3f %8.3f  %6.3f | %6.2f %6.2f %6.2f | %5d / %-5d (%5.2f)  "
                  "     | %11.4f  %10.4f  %5.3f\n",
                  s.stage, static_cast<long long>(s.layers), s.busy_s, s.makespan_s, s.bubble,
                  s.f_ms, s.b_ms, s.w_ms, s.peak_in_flight_chunks, s.schedule_in_flight_chunks,
                  s.peak_in_flight, s.peak_activation_bytes / 1e6, f / 1e6,
                  f > 0 ? s.peak_activation_bytes / f : 0.0);
    out << line;
  }
  std::snprintf(line, sizeof(line),
                "[stats] bubble: measured %.4f (1 - sum busy / (p x longest span)), formula %.4f, "
                "simulator replaying each stage's measured F/B/W %.4f\n",
                r.bubble, r.bubble_formula, r.sim_bubble);
  out << line;
  if (!r.replay.empty()) {
    out << "[stats] replay of the mean measured F/B/W at p stages (simulated bubble / formula):";
    for (const ReplayStats& q : r.replay) {
      std::snprintf(line, sizeof(line), " p=%d %.3f/%.3f", q.stages, q.bubble, q.formula);
      out << line;
    }
    out << " (m=" << r.replay.front().micro_batches << ")\n";
  }
  out.flush();
}

void request_training_stop() {
  g_stop.store(1, std::memory_order_relaxed);
}
void clear_training_stop() {
  g_stop.store(0, std::memory_order_relaxed);
}

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
  if (o.ep > 1 && !config.is_moe())
    fail("train", "--ep ", o.ep, " needs a mixture-of-experts model (num_local_experts in "
                  "config.json); this model is dense");
  if (config.is_moe()) {
    if (config.is_qwen2_moe())
      fail("train", "model_type qwen2_moe cannot be trained (its shared expert and q/k/v biases "
                    "have no backward here); Mixtral-style models can");
    if (std::string why = parallel::moe_ep_problem(config.num_local_experts, o.ep); !why.empty())
      fail("train", "--ep ", o.ep, " does not fit the model: ", why);
    if (o.pp > 1)
      fail("train", "--pp ", o.pp,
           " with a mixture-of-experts model is not supported (use --pp 1)");
    if (o.sp && o.tp > 1)
      fail("train", "--sp with a mixture-of-experts model is not supported");
  }
  return config;
}

TrainResult run_training(const TrainOptions& o, std::ostream* progress) {
  std::ostream& out = progress ? *progress : std::cerr;
  check_options(o);
  BatchOrder order;
  order.seq_len = o.seq_len;
  order.global_batch = o.global_batch;
  order.micro_batch = o.micro_batch;
  order.dp = o.dp * o.ep;  // the EP ranks are data-parallel ranks
  order.shuffle = o.shuffle;
  order.seed = o.seed;
  if (o.ep > 1 && o.micro_batch > 0 && o.global_batch % (o.micro_batch * o.dp * o.ep) != 0)
    fail("train", "--global-batch-size ", o.global_batch,
         " is not a multiple of --micro-batch-size ", o.micro_batch, " x --dp ", o.dp, " x --ep ",
         o.ep, " (= ", o.micro_batch * o.dp * o.ep, "; the EP ranks are data-parallel ranks)");
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
    if (!o.model.empty() &&
        (save == canonical_or_empty(o.model) || save == canonical_or_empty(model_dir(o.model))))
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
  if (val) val->sequences(o.seq_len);  // throws naming the file when shorter than a sequence
  for (const auto* d : {data.get(), val.get()})
    if (d)
      for (int32_t id : d->ids())
        if (id < 0 || id >= config.vocab_size)
          fail("train", "token id ", id, " in the data is outside the vocabulary [0, ",
               config.vocab_size, ")");
  if (!o.trace.empty() && comm::launched_rank() == 0) {
    // Found unwritable now, not after the training.
    const bool existed = fs::exists(o.trace);
    if (!std::ofstream(o.trace, std::ios::app))
      fail("train", "--trace ", o.trace, ": cannot open for writing");
    if (!existed) fs::remove(o.trace);
  }
  std::ofstream log;
  if (!o.log_json.empty() && comm::launched_rank() == 0) {
    log.open(o.log_json, start > 0 ? std::ios::app : std::ios::trunc);
    if (!log) fail<std::runtime_error>("train", "--log-json ", o.log_json, ": cannot open");
  }

  // The pipeline, checked before any rank starts.
  const int64_t nm = order.micro_batches();
  PipelinePlan pipe;
  if (o.pp > 1) pipe = plan_pipeline(o, config, nm);
  const bool pipelined = o.pp > 1;
  const bool zb = pipelined && pipe.kind == pipeline::ScheduleKind::ZeroBubbleH1;
  const Recompute recompute = parse_recompute(o.recompute, "--recompute");

  const int world_size = o.tp * o.pp * o.dp * o.ep;
  comm::LaunchOptions lo;
  lo.backend = o.backend;
  lo.timeout_s = o.comm_timeout_s;
  lo.print_stats = o.comm_stats;
  lo.stats_out = &out;
  const int threads =
      o.threads > 0
          ? o.threads
          : std::max(1, ThreadPool::hardware_threads() / comm::ranks_on_this_node(world_size));
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
  if (pipelined) result.schedule_name = pipe.schedule.name();
  if (!o.quiet && comm::launched_rank() == 0) {
    out << "[train] " << config.param_count() << " parameters, " << config.num_hidden_layers
        << " layers, hidden " << config.hidden_size << "; tp " << o.tp << " x pp " << o.pp
        << " x dp " << o.dp << (o.ep > 1 ? cat(" x ep ", o.ep) : "")
        << (o.zero ? " (ZeRO-1)" : "") << ", " << threads
        << " threads per rank; " << sequences << " sequences of " << S << " tokens, " << G
        << " per step (" << nm << " micro-batches of " << M << " per DP rank)"
        << (start > 0 ? "; resuming at step " : "") << (start > 0 ? std::to_string(start) : "")
        << std::endl;
    if (pipelined) {
      std::vector<std::string> split;
      for (const auto& l : pipe.virtual_stages) split.push_back(std::to_string(l.count()));
      out << "[train] pipeline: " << pipe.schedule.name() << ", layers per virtual stage "
          << join(split, ",") << "; bubble formula "
          << pipeline::bubble_formula(pipe.kind, o.pp, static_cast<int>(nm), pipe.v) << std::endl;
    }
    if (o.sp && o.tp == 1) out << "[train] note: --sp at --tp 1 changes nothing" << std::endl;
    if ((o.sp && o.tp > 1) || recompute != Recompute::None)
      out << "[train] sequence parallelism " << (o.sp && o.tp > 1 ? "on" : "off")
          << ", recompute " << recompute_name(recompute) << std::endl;
  }

  std::mutex mu;
  comm::launch(world_size, lo, [&](comm::Group world) {
    ThreadPool pool(threads);
    ScopedPool scoped(pool);
    TraceBuffer trace(world.rank());
    if (!o.trace.empty()) set_thread_trace(&trace);
    // EP is carved from the data ranks (comm/mesh.h): mesh.dp() is all DP x EP data ranks (the
    // dense gradients' all-reduce), mesh.ep() a block of EP consecutive ones.
    comm::Mesh mesh(world, {o.tp, o.pp, o.dp * o.ep, o.ep});
    const int tp_rank = mesh.tp_rank(), dp_rank = mesh.dp_rank(), stage = mesh.pp_rank();
    const bool root = world.rank() == 0;
    TrainModelOptions mo;
    mo.compute = o.dtype == "bf16" ? DType::BF16 : DType::F32;
    mo.threads = threads;
    mo.recompute = recompute;
    mo.mode.sequence_parallel = o.sp && o.tp > 1;
    mo.mode.defer_weight_grads = zb;
    mo.ep = mesh.ep();
    mo.aux_scale = static_cast<double>(M) / static_cast<double>(G);  // 1 / micro-batches per step
    if (pipelined) mo = pipeline_chunks(mo, pipe.virtual_stages, o.pp, stage, pipe.v);
    ParamStore params(config, o.tp, tp_rank, pipelined ? stage_tensors(mo) : StageTensors{}, o.ep,
                      mesh.ep_rank());
    if (o.resume.empty()) {
      if (!o.model.empty()) {
        ModelConfig c;
        params.load(*open_model(o.model, &c));
      } else {
        init_params(params, config, o.seed);
      }
    }
    // Expert parallelism: the experts' range of the flat buffers (this rank's experts, the same
    // ones on every EP block) is reduced over the expert-data-parallel group (mesh.edp(): DP
    // ranks), everything else over all DP x EP data ranks (mesh.dp()).
    const bool split_experts = o.ep > 1;
    std::vector<Param> dense_params, expert_params;
    for (const Param& p : params.params())
      (split_experts && p.expert ? expert_params : dense_params).push_back(p);
    DpOptions dpo{bucket_bytes, o.zero == 1, o.overlap};
    if (!o.trace.empty()) dpo.trace_rank = world.rank();
    DataParallel dp(dense_params, split_experts ? params.expert_begin() : params.size(),
                    params.values(), params.grads(), mesh.dp(), dpo);
    std::unique_ptr<DataParallel> edp;
    if (split_experts) {
      DpOptions edpo = dpo;
      edpo.trace_thread = 2;
      edpo.trace_name = "expert dp comm";
      edp = std::make_unique<DataParallel>(expert_params, params.size(), params.values(),
                                           params.grads(), mesh.edp(), edpo);
    }
    if (!o.resume.empty())
      load_checkpoint(o.resume, config, params, dp, o.tp, tp_rank, edp.get());
    TrainModel model(config, params, mesh.tp(), mo);
    model.refresh_compute_weights();
    // Tied embeddings across stages: the first stage's embedding and the last stage's copy get
    // their gradients summed after the schedule, so neither may start its DP reduction before.
    const Param* tied = nullptr;
    if (pipelined && config.tie_word_embeddings) {
      for (const Param& p : params.params())
        if (p.tied_copy || (stage == 0 && p.tensor.name == llama_tensors(config)[0].name))
          tied = &p;
    }
    model.set_grad_ready_hook([&dp, &edp, tied](const Param& p) {
      if (tied && p.offset == tied->offset) return;
      if (edp && p.expert)
        edp->grad_ready(p);
      else
        dp.grad_ready(p);
    });

    // What every rank holds, measured from its allocations.
    {
      int64_t mine[3] = {static_cast<int64_t>(dp.optimizer_bytes()), dp.param_numel(),
                         dp.state_size()};
      if (edp) {  // values and grads of the experts' range, and their m and v
        mine[0] += 4 * (2 * (params.size() - params.expert_begin()) + 2 * edp->state_size());
        mine[1] += edp->param_numel();
        mine[2] += edp->state_size();
      }
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
      save_checkpoint(o.save, config, params, dp, mesh, state, tok_files, edp.get());
      if (root && !o.quiet)
        out << "[train] saved " << o.save << " at step " << step << " in "
            << static_cast<int>(t.millis()) << " ms" << std::endl;
    };
    std::vector<int32_t> inputs(static_cast<size_t>(M * S)), targets(inputs.size());
    // ---- the pipeline's step: callbacks of this stage's action list ----
    std::unique_ptr<pipeline::StageLink> link;
    if (pipelined) link = std::make_unique<pipeline::StageLink>(mesh.pp(), 0, pipe.v);
    const int64_t act_count = model.activation_rows(M, S) * config.hidden_size;
    const int vlast = pipe.schedule.virtual_stages() - 1;
    auto vstage = [&](int chunk) { return pipe.schedule.virtual_stage(stage, chunk); };
    // The step's last backward (ZB-H1: W) of each chunk completes its parameters' gradients.
    std::vector<int> last_mb(static_cast<size_t>(pipe.v), -1);
    if (pipelined)
      for (const pipeline::Action& a : pipe.schedule.actions(stage))
        if (a.kind == pipeline::ActionKind::Backward ||
            a.kind == pipeline::ActionKind::BackwardWeight)
          last_mb[a.chunk] = a.micro_batch;
    using Key = std::pair<int, int>;  // (micro-batch, local chunk)
    std::map<Key, std::vector<float>> x_out, dy, dx;
    std::map<Key, std::pair<const float*, int>> x_in;  // rows in the link's buffer, sender chunk
    StageClock clock, step_clock;
    double loss_sum = 0, aux_sum = 0;
    int64_t cur_step = 0;
    auto peer = [&](pipeline::ActionKind kind, int mb, int chunk) {
      return pipe.schedule.peer(stage, pipeline::Action{kind, mb, chunk});
    };
    auto need = [](const std::vector<float>* v, const char* what, int mb, int chunk) {
      if (!v)
        fail<std::logic_error>("train", "pipeline: no ", what, " for micro-batch ", mb, " chunk ",
                               chunk);
      return v;
    };
    auto find = [](std::map<Key, std::vector<float>>& m, int mb, int chunk) {
      auto it = m.find({mb, chunk});
      return it == m.end() ? nullptr : &it->second;
    };
    pipeline::StageCallbacks cb;
    cb.forward = [&](int mb, int chunk) {
      fill_micro_batch(*data, order, cur_step, dp_rank, mb, inputs.data(), targets.data());
      const float* in = nullptr;
      if (vstage(chunk) > 0) {
        auto it = x_in.find({mb, chunk});
        if (it == x_in.end())
          fail<std::logic_error>("train", "pipeline: forward ", mb, ".", chunk,
                                 " before its activation arrived");
        in = it->second.first;
      }
      float* outp = nullptr;
      if (vstage(chunk) < vlast) {
        std::vector<float>& buf = x_out[{mb, chunk}];
        buf.resize(static_cast<size_t>(act_count));
        outp = buf.data();
      }
      const double t0 = now_seconds();
      loss_sum +=
          model.forward(mb, chunk, inputs.data(), targets.data(), M, S, grad_scale, in, outp);
      const double dt = now_seconds() - t0;
      step_clock.busy += dt;
      step_clock.f += dt;
      ++step_clock.nf;
      if (in) {  // the model copied the rows into the micro-batch's state
        link->release(mb, x_in.at({mb, chunk}).second);
        x_in.erase({mb, chunk});
      }
    };
    // The backward's two halves (or the whole): dy in from the next virtual stage, dx out.
    auto run_backward = [&](int mb, int chunk, bool input_only) {
      const float* g = nullptr;
      if (vstage(chunk) < vlast)
        g = need(find(dy, mb, chunk), "output gradient", mb, chunk)->data();
      float* d = nullptr;
      if (vstage(chunk) > 0) {
        std::vector<float>& buf = dx[{mb, chunk}];
        buf.resize(static_cast<size_t>(act_count));
        d = buf.data();
      }
      const double t0 = now_seconds();
      if (input_only)
        model.backward_input(mb, chunk, g, d);
      else
        model.backward(mb, chunk, g, d, mb == last_mb[chunk]);
      const double dt = now_seconds() - t0;
      step_clock.busy += dt;
      step_clock.b += dt;
      ++step_clock.nb;
      dy.erase({mb, chunk});
    };
    cb.backward = [&](int mb, int chunk) { run_backward(mb, chunk, false); };
    cb.backward_input = [&](int mb, int chunk) { run_backward(mb, chunk, true); };
    cb.backward_weight = [&](int mb, int chunk) {
      const double t0 = now_seconds();
      model.backward_weight(mb, chunk, mb == last_mb[chunk]);
      const double dt = now_seconds() - t0;
      step_clock.busy += dt;
      step_clock.w += dt;
      ++step_clock.nw;
    };
    // Messages are keyed by the sender's (micro-batch, local chunk); each kind has its own tags.
    cb.send_activation = [&](int mb, int chunk) {
      const pipeline::Peer to = peer(pipeline::ActionKind::SendActivation, mb, chunk);
      const std::vector<float>* buf = need(find(x_out, mb, chunk), "activation", mb, chunk);
      link->send_activation(to.stage, mb, chunk, nullptr, 0, buf->data(), buf->size());
      x_out.erase({mb, chunk});  // send copies or delivers: the buffer is free again
    };
    cb.recv_activation = [&](int mb, int chunk) {
      const pipeline::Peer from = peer(pipeline::ActionKind::RecvActivation, mb, chunk);
      pipeline::Activation& a = link->recv_activation(from.stage, mb, from.chunk);
      if (static_cast<int64_t>(a.data.size()) != act_count)
        fail<std::runtime_error>("train", "pipeline stage ", stage, ": activation of ",
                                 a.data.size(), " floats from stage ", from.stage, ", expected ",
                                 act_count);
      x_in[{mb, chunk}] = {a.data.data(), from.chunk};  // the link's buffer, until the forward
    };
    cb.send_grad = [&](int mb, int chunk) {
      const pipeline::Peer to = peer(pipeline::ActionKind::SendGrad, mb, chunk);
      const std::vector<float>* buf = need(find(dx, mb, chunk), "input gradient", mb, chunk);
      link->send_grad(to.stage, mb, chunk, buf->data(), buf->size());
      dx.erase({mb, chunk});
    };
    cb.recv_grad = [&](int mb, int chunk) {
      const pipeline::Peer from = peer(pipeline::ActionKind::RecvGrad, mb, chunk);
      std::vector<float>& buf = dy[{mb, chunk}];
      buf.resize(static_cast<size_t>(act_count));
      link->recv_grad(from.stage, mb, from.chunk, buf.data(), buf.size());
    };
    // After the schedule: the tied embedding's two gradients summed, the same on both stages.
    auto sum_tied = [&]() {
      if (!tied) return;
      const int other = stage == 0 ? o.pp - 1 : 0;
      constexpr int kTiedTag = pipeline::StageLink::kFirstTag - 1;
      float* g = params.grad(*tied);
      const size_t n = static_cast<size_t>(tied->numel);
      std::vector<float> theirs(n);
      mesh.pp().send(g, n * sizeof(float), other, kTiedTag);
      mesh.pp().recv(theirs.data(), n * sizeof(float), other, kTiedTag);
      // first + last on both (f32 addition commutes, so the two stages hold the same bits).
      for (size_t i = 0; i < n; ++i) g[i] = stage == 0 ? g[i] + theirs[i] : theirs[i] + g[i];
      dp.grad_ready(*tied);
    };

    // The validation loss. PP > 1: the micro-batches' forwards alone through the pipeline, in
    // (micro-batch, virtual stage) order, each state discarded at once. That order is a
    // topological order of the forwards, so each stage's part of it cannot deadlock under
    // buffered sends; no training message is in flight between steps, so the keys are free.
    auto evaluate = [&]() {
      BatchOrder vo = order;
      vo.shuffle = false;
      double sum = 0;
      std::vector<float> out_rows;
      for (int64_t e = 0; e < o.eval_batches; ++e)
        for (int64_t micro = 0; micro < nm; ++micro) {
          fill_micro_batch(*val, vo, e, dp_rank, micro, inputs.data(), targets.data());
          if (!pipelined) {
            sum += model.loss(inputs.data(), targets.data(), M, S);
            continue;
          }
          const int mb = static_cast<int>(micro);
          for (int c = 0; c < pipe.v; ++c) {
            const float* in = nullptr;
            pipeline::Peer from;
            if (vstage(c) > 0) {
              from = peer(pipeline::ActionKind::RecvActivation, mb, c);
              const pipeline::Activation& a = link->recv_activation(from.stage, mb, from.chunk);
              if (static_cast<int64_t>(a.data.size()) != act_count)
                fail<std::runtime_error>("train", "pipeline stage ", stage, ": activation of ",
                                         a.data.size(), " floats, expected ", act_count);
              in = a.data.data();
            }
            float* outp = nullptr;
            if (vstage(c) < vlast) {
              out_rows.resize(static_cast<size_t>(act_count));
              outp = out_rows.data();
            }
            sum += model.forward(mb, c, inputs.data(), targets.data(), M, S, grad_scale, in, outp);
            model.discard(mb, c);
            if (in) link->release(mb, from.chunk);
            if (outp) {
              const pipeline::Peer to = peer(pipeline::ActionKind::SendActivation, mb, c);
              link->send_activation(to.stage, mb, c, nullptr, 0, outp, out_rows.size());
            }
          }
        }
      if (pipelined) sum = sum_over(mesh.pp(), stage == o.pp - 1 ? sum : 0.0);
      return dp.sum_over_dp(sum) / static_cast<double>(o.eval_batches * G * S);
    };

    model.reset_stats();
    world.barrier();  // the ranks start their clocks together
    Timer run_clock;
    int64_t end = o.stop_after > 0 ? std::min(o.stop_after, o.steps) : o.steps;
    for (int64_t step = start; step < end; ++step) {
      Timer t;
      params.zero_grads();
      loss_sum = 0;
      aux_sum = 0;
      if (!pipelined) {
        for (int64_t micro = 0; micro < nm; ++micro) {
          fill_micro_batch(*data, order, step, dp_rank, micro, inputs.data(), targets.data());
          // Only the last micro-batch's gradients are final: its backward starts the buckets.
          if (micro == nm - 1) {
            dp.begin_sync();
            if (edp) edp->begin_sync();
          }
          TraceSpan span(thread_trace() ? cat("F+B ", micro) : std::string(), "compute");
          loss_sum += model.forward_backward(inputs.data(), targets.data(), M, S, grad_scale);
          aux_sum += model.last_aux_loss();
        }
      } else {
        // The model fires the grad-ready hooks on each chunk's last backward only.
        cur_step = step;
        step_clock = {};
        dp.begin_sync();
        const double t0 = now_seconds();
        pipeline::execute_stage(pipe.schedule, stage, cb);
        step_clock.makespan = now_seconds() - t0;
        sum_tied();
        // Only the last stage has the loss: a sum over PP of 0s and it is that value exactly.
        loss_sum = sum_over(mesh.pp(), stage == o.pp - 1 ? loss_sum : 0.0);
        // The first step pays for the first touches of every buffer: not counted when more follow.
        if (step > start || end - start == 1) {
          clock.busy += step_clock.busy;
          clock.makespan += step_clock.makespan;
          clock.f += step_clock.f;
          clock.b += step_clock.b;
          clock.w += step_clock.w;
          clock.nf += step_clock.nf;
          clock.nb += step_clock.nb;
          clock.nw += step_clock.nw;
        }
      }
      dp.finish_sync();
      if (edp) edp->finish_sync();
      const double loss = dp.sum_over_dp(loss_sum) / static_cast<double>(G * S);
      // The mean of the micro-batches' load-balancing losses (each data rank's own; PP 1).
      const double aux = config.is_moe() ? dp.sum_over_dp(aux_sum) * static_cast<double>(M) /
                                               static_cast<double>(G)
                                         : 0.0;
      // The global norm: each sharded slice once, TP-replicated tensors once (Param::counts_once:
      // norms on TP rank 0, a replicated KV head on the first of its replicas, a tied embedding on
      // the first stage), each stage's parameters once over PP, and with ZeRO each rank's reduced
      // shard once over DP.
      double sq = sum_over(mesh.tp(), dp.local_grad_sq(tp_rank));
      if (pipelined) sq = sum_over(mesh.pp(), sq);
      if (dp.zero()) sq = dp.sum_over_dp(sq);
      if (edp) {
        // The experts: each element once over TP (slices), over EDP (ZeRO's owner) and over EP
        // (every rank holds other experts).
        double e = sum_over(mesh.tp(), edp->local_grad_sq(tp_rank));
        if (edp->zero()) e = edp->sum_over_dp(e);
        sq += sum_over(mesh.ep(), e);
      }
      const double norm = std::sqrt(sq);
      const double lr = learning_rate(adamw, step);
      const float clip = static_cast<float>(clip_factor(adamw.grad_clip, norm));
      {
        TraceSpan span("optimizer", "compute");
        dp.step(adamw, lr, step + 1, clip);
        if (edp) edp->step(adamw, lr, step + 1, clip);
        model.refresh_compute_weights();
      }
      StepRecord rec;
      rec.step = step + 1;
      rec.loss = loss;
      rec.aux_loss = aux;
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
          char line[256], aux_part[64] = "";
          // MoE: the load-balancing loss beside the LM loss (its weight in the optimised loss).
          if (config.is_moe())
            std::snprintf(aux_part, sizeof(aux_part), " | aux loss %.4f (x %g)", aux,
                          config.router_aux_loss_coef);
          std::snprintf(
              line, sizeof(line),
              "[train] step %lld/%lld | loss %.4f%s | lr %.3e | grad norm %.4f | %.0f "
              "tok/s | %s left",
              static_cast<long long>(step + 1), static_cast<long long>(o.steps), loss, aux_part,
              lr, norm, rec.tokens_per_s,
              format_duration(per_step * static_cast<double>(o.steps - step - 1)).c_str());
          out << line;
          if (rec.val_loss >= 0) out << " | val loss " << rec.val_loss;
          out << std::endl;
        }
        if (log.is_open()) {
          nlohmann::json j;
          j["step"] = rec.step;
          j["loss"] = rec.loss;
          if (config.is_moe()) j["aux_loss"] = rec.aux_loss;
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
      if (!o.save.empty() && o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < end)
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
    if (pipelined) {
      // Every rank's measurements to every rank (as bits); world rank 0 keeps TP 0, DP 0's.
      const TrainModel::ActivationStats as = model.activation_stats();
      int64_t layers = 0;
      for (const auto& l : mo.chunks) layers += l.count();
      const double mine[kStageFields] = {static_cast<double>(stage),
                                         static_cast<double>(layers),
                                         clock.busy,
                                         clock.makespan,
                                         clock.f,
                                         static_cast<double>(clock.nf),
                                         clock.b,
                                         static_cast<double>(clock.nb),
                                         clock.w,
                                         static_cast<double>(clock.nw),
                                         static_cast<double>(as.peak_in_flight),
                                         static_cast<double>(as.peak_bytes)};
      std::vector<double> all(kStageFields * static_cast<size_t>(world.size()));
      world.all_gather(mine, all.data(), kStageFields, DType::I64);
      if (root) {
        std::lock_guard<std::mutex> lock(mu);
        fill_stage_stats(result, all, mesh, pipe, o, nm, config, recompute);
      }
    }
    if (o.keep_params) {
      std::vector<std::pair<std::string, Tensor>> full =
          gather_full_tensors(params, mesh.tp());
      // Under EP the first EP block holds every expert once: EP rank 0 sends everything, the
      // others their experts.
      const bool mine = tp_rank == 0 && dp_rank < o.ep;
      std::vector<std::pair<std::string, Tensor>> sent;
      for (size_t i = 0; i < full.size(); ++i)
        if (mesh.ep_rank() == 0 || params.params()[i].expert) sent.push_back(std::move(full[i]));
      const std::string packed =
          mine ? pack_tensors(sent, llama_tensors(config)[0].name, pipelined && stage > 0) : "";
      const std::vector<std::string> all = comm::gather_strings(world, packed, 0);
      if (root) {
        std::lock_guard<std::mutex> lock(mu);
        for (const std::string& s : all) unpack_tensors(s, &result.final_params);
      }
    }
    if (!o.trace.empty()) {
      set_thread_trace(nullptr);
      std::string events = trace.to_json_events();
      for (const DataParallel* d : std::initializer_list<const DataParallel*>{&dp, edp.get()})
        if (const std::string more = d ? d->trace_events() : ""; !more.empty())
          events += ",\n" + more;
      const std::vector<std::string> all = comm::gather_strings(world, events, 0);
      if (root) write_trace_file(o.trace, all);
    }
  });
  if (o.stats && comm::launched_rank() == 0) {
    if (pipelined)
      print_pipeline_stats(result, out);
    else
      out << "[stats] --stats measures pipelines: nothing to report at --pp 1" << std::endl;
  }
  return result;
}

}  // namespace parallm::train
