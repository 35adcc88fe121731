// The serving engine's front (serve_engine.h): starts the ranks (threads, or this process's rank
// under mpirun) on a background thread, gives each replica's first rank its Scheduler, and sends
// each request to the least-loaded replica.
#include "parallm/engine/serve_engine.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <mutex>
#include <thread>

#include "parallm/comm/launch.h"
#include "parallm/core/error.h"
#include "parallm/engine/paged_kv_cache.h"
#include "parallm/engine/runtime.h"
#include "parallm/engine/scheduler.h"
#include "parallm/engine/serve_loop.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/weights.h"
#include "parallm/parallel/shard.h"
#include "parallm/pipeline/partition.h"

namespace parallm::serve {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

EngineOptions engine_options(const ServeConfig& c) {
  EngineOptions o;
  o.model = c.model;
  o.tp = c.tp;
  o.pp = c.pp;
  o.dp = c.dp;
  o.enable_expert_parallel = c.enable_expert_parallel;
  o.pp_layers = c.pp_layers;
  o.threads = c.threads;
  o.dtype = c.dtype;
  o.backend = c.backend;
  o.comm_timeout_s = c.comm_timeout_s;
  o.pp_split = c.pp_split;
  return o;
}

// split: the layout's --pp-split (RankContext::split_pp_hops); the scheduler's side has none.
ServeLoopConfig loop_config(const ServeConfig& c, const KvLayout& kv, bool split = false) {
  ServeLoopConfig l;
  l.split_pp_hops = split;
  l.max_num_seqs = c.max_num_seqs;
  l.max_num_batched_tokens = c.max_num_batched_tokens;
  l.block_size = c.block_size;
  l.num_blocks = kv.num_blocks;
  l.max_model_len = kv.max_model_len;
  l.idle_tick_s = c.idle_tick_s;
  return l;
}

void check_config(const ServeConfig& c) {
  if (c.tp < 1) fail("serve", "--tensor-parallel-size must be >= 1, got ", c.tp);
  if (c.pp < 1) fail("serve", "--pipeline-parallel-size must be >= 1, got ", c.pp);
  if (c.dp < 1) fail("serve", "--data-parallel-size must be >= 1, got ", c.dp);
  if (c.kv_cache_fraction < 0 || c.kv_cache_fraction > 1)
    fail("serve", "--kv-cache-memory ", c.kv_cache_fraction, ": a fraction must be in (0, 1]");
  if (c.max_num_seqs < 1) fail("serve", "--max-num-seqs must be >= 1, got ", c.max_num_seqs);
  if (c.max_num_batched_tokens < 1)
    fail("serve", "--max-num-batched-tokens must be >= 1, got ", c.max_num_batched_tokens);
  if (c.block_size < 1 || c.block_size > 1024)
    fail("serve", "--block-size must be in [1, 1024], got ", c.block_size);
  if (c.max_model_len < 0) fail("serve", "--max-model-len must be >= 0, got ", c.max_model_len);
  if (c.max_waiting < 1) fail("serve", "the queue limit must be >= 1, got ", c.max_waiting);
  if (!(c.idle_tick_s > 0) || c.idle_tick_s >= c.comm_timeout_s)
    fail("serve", "the idle tick (", c.idle_tick_s, " s) must be in (0, --comm-timeout ",
         c.comm_timeout_s, ")");
}

std::string model_name(const ServeConfig& c) {
  if (!c.served_model_name.empty()) return c.served_model_name;
  std::filesystem::path p(c.model);
  while (!p.empty() && p.filename().empty()) p = p.parent_path();  // "dir/" -> "dir"
  return p.filename().string();
}

// With a fraction of MemAvailable, processes under mpirun read it at slightly different times and
// could cut different block counts: world rank 0's (its scheduler hands out the block ids) is
// adopted by every rank. Threads share one layout already.
void agree_on_blocks(const ServeConfig& c, const comm::Group& world, KvLayout& kv) {
  if (c.kv_cache_fraction <= 0 || world.size() == 1 || !comm::under_mpirun()) return;
  int64_t n = kv.num_blocks;
  world.broadcast(&n, 1, DType::I64, 0);
  kv.num_blocks = n;
}

// DP under mpirun: every replica's scheduler lives in world rank 0's process (the front, which
// serves HTTP and picks the least-loaded replica); replica d's first rank (world rank
// global_rank(0, d, 0)) reaches it over a two-rank group {0, that rank}, one per replica d >= 1,
// made here by collective splits of the world (every rank calls this). Elsewhere: none.
std::vector<comm::Group> front_links(const ServeConfig& c, const RankContext& ctx) {
  std::vector<comm::Group> links(c.dp);
  if (c.dp == 1 || !comm::under_mpirun()) return links;
  const int me = ctx.world.rank();
  for (int d = 1; d < c.dp; ++d) {
    const int leader = ctx.mesh.global_rank(0, d, 0);
    const bool in = me == 0 || me == leader;
    comm::Group g = ctx.world.split(in ? 1 : 0, me == 0 ? 0 : 1, "dp-front");
    if (in) links[d] = g;
  }
  return links;
}

class Engine : public ServeEngine {
 public:
  explicit Engine(const ServeConfig& c) : cfg_(c) {
    check_config(c);
    ModelConfig mc;
    open_model(c.model, &mc);
    kv_ = serve_kv_layout(c);
    info_.name = model_name(c);
    info_.max_model_len = kv_.max_model_len;
    info_.vocab_size = static_cast<int32_t>(mc.vocab_size);
    for (int d = 0; d < c.dp; ++d) {
      SchedulerConfig s;
      s.lanes = c.pp;
      s.max_num_seqs = c.max_num_seqs;
      s.max_num_batched_tokens = c.max_num_batched_tokens;
      s.block_size = c.block_size;
      s.num_blocks = kv_.num_blocks;
      s.enable_prefix_caching = c.enable_prefix_caching;
      s.max_model_len = kv_.max_model_len;
      s.max_waiting = c.max_waiting;
      s.vocab_size = info_.vocab_size;
      s.eos_token_ids = mc.eos_token_ids;
      replicas_.push_back(std::make_unique<Scheduler>(s));
    }
    thread_ = std::thread([this] { run(); });
  }

  ~Engine() override { shutdown(); }

  uint64_t submit(Submission s, RequestCallbacks cb) override {
    // The least-loaded replica (running + waiting); ties go round-robin.
    const int n = static_cast<int>(replicas_.size());
    const int start = static_cast<int>(next_.fetch_add(1) % n);
    int best = start;
    int64_t best_load = replicas_[start]->load();
    for (int k = 1; k < n; ++k) {
      const int d = (start + k) % n;
      const int64_t l = replicas_[d]->load();
      if (l < best_load) best = d, best_load = l;
    }
    const uint64_t id = ids_.fetch_add(1) + 1;
    replicas_[best]->submit(id, std::move(s), std::move(cb));
    return id;
  }

  void cancel(uint64_t id) override {
    for (auto& r : replicas_) r->cancel(id);  // each ignores ids it does not hold
  }

  EngineStats stats() const override {
    EngineStats t;
    for (const auto& r : replicas_) {
      const EngineStats s = r->stats();
      t.running += s.running;
      t.running_peak = std::max(t.running_peak, s.running_peak);
      t.waiting += s.waiting;
      t.kv_blocks_total += s.kv_blocks_total;
      t.kv_blocks_used += s.kv_blocks_used;
      t.prompt_tokens_total += s.prompt_tokens_total;
      t.generation_tokens_total += s.generation_tokens_total;
      t.preemptions_total += s.preemptions_total;
      t.prefix_cache_queries_total += s.prefix_cache_queries_total;
      t.prefix_cache_hits_total += s.prefix_cache_hits_total;
      t.requests_finished_total += s.requests_finished_total;
    }
    t.kv_usage = t.kv_blocks_total > 0 ? static_cast<double>(t.kv_blocks_used) /
                                             static_cast<double>(t.kv_blocks_total)
                                       : 0.0;
    return t;
  }

  const ModelInfo& info() const override { return info_; }

  bool ready() const override {
    return ready_count_.load() == static_cast<int>(replicas_.size()) && !ended_.load();
  }

  std::string failure() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return failure_;
  }

  void shutdown() override {
    std::lock_guard<std::mutex> lock(shutdown_mu_);
    for (auto& r : replicas_) r->stop();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    std::string why;
    try {
      run_model(engine_options(cfg_), [&](RankContext& ctx) {
        KvLayout kv = kv_;
        agree_on_blocks(cfg_, ctx.world, kv);
        const comm::Mesh& mesh = ctx.mesh;
        const bool first = mesh.pp_rank() == 0 && mesh.tp_rank() == 0;
        Scheduler* s = first ? replicas_.at(mesh.dp_rank()).get() : nullptr;
        const std::vector<comm::Group> links = front_links(cfg_, ctx);
        // Under mpirun (this is world rank 0) the other replicas' schedulers are served from here.
        std::vector<std::thread> remotes;
        for (int d = 1; d < static_cast<int>(links.size()); ++d) {
          if (links[d].size() != 2) continue;
          remotes.emplace_back([this, &links, &kv, d] {
            try {
              serve_remote_scheduler(*replicas_[d], links[d], loop_config(cfg_, kv),
                                     [this] { ++ready_count_; });
            } catch (const std::exception& e) {
              // The replica's ranks would wait for this thread forever: end the job.
              std::fprintf(stderr, "[serve] the scheduler of replica %d failed: %s\n", d,
                           e.what());
              std::abort();
            }
          });
        }
        try {
          run_serve_loop(ctx.model, mesh.tp(), mesh.pp(), loop_config(cfg_, kv, ctx.split_pp_hops),
                         s, [&] {
                           if (first) ++ready_count_;
                         });
        } catch (...) {
          for (auto& t : remotes) t.detach();  // MPI ends the job on the way out
          throw;
        }
        for (auto& t : remotes) t.join();
      });
    } catch (const std::exception& e) {
      why = e.what();
      std::lock_guard<std::mutex> lock(mu_);
      failure_ = why;
    }
    ended_ = true;
    // Whatever is left (a failure, or requests that arrived during the shutdown) ends here.
    for (auto& r : replicas_) r->fail_all(why.empty() ? "the engine has shut down" : why);
  }

  ServeConfig cfg_;
  KvLayout kv_;
  ModelInfo info_;
  std::vector<std::unique_ptr<Scheduler>> replicas_;
  std::atomic<uint64_t> ids_{0}, next_{0};
  std::atomic<int> ready_count_{0};
  std::atomic<bool> ended_{false};
  mutable std::mutex mu_;
  std::string failure_;
  std::mutex shutdown_mu_;
  std::thread thread_;
};

}  // namespace

KvLayout serve_kv_layout(const ServeConfig& c) {
  check_config(c);
  ModelConfig mc;
  open_model(c.model, &mc);
  // Before the heads' check, and in generate's words (run_model makes the same check).
  if (c.enable_expert_parallel) {
    const std::string why = llama_expert_parallel_problem(mc, c.tp, 1);
    if (!why.empty()) fail("cli", why);
  }
  KvLayout kv;
  kv.max_model_len = c.max_model_len > 0 ? c.max_model_len : mc.max_position_embeddings;
  if (kv.max_model_len > mc.max_position_embeddings)
    fail("serve", "--max-model-len ", kv.max_model_len,
         " exceeds the model's max_position_embeddings ", mc.max_position_embeddings);
  const auto stages = pipeline::partition_layers(mc.num_hidden_layers, c.pp, c.pp_layers);
  int64_t layers = 0;
  for (const auto& s : stages) layers = std::max(layers, s.end - s.begin);
  const parallel::HeadPlan heads =
      parallel::HeadPlan::make(mc.num_attention_heads, mc.num_key_value_heads, c.tp, 0);
  kv.block_bytes = kv_block_bytes(layers, heads.kv_heads * mc.head_dim, c.block_size);
  const int64_t per_seq = ceil_div(kv.max_model_len, c.block_size);
  if (c.kv_cache_fraction > 0) {
    kv.mem_available = mem_available_bytes();
    const int ranks = comm::ranks_on_this_node(c.tp * c.pp * c.dp);
    kv.budget_bytes = static_cast<uint64_t>(c.kv_cache_fraction *
                                            static_cast<double>(kv.mem_available) / ranks);
    kv.num_blocks = static_cast<int64_t>(kv.budget_bytes / kv.block_bytes);
    if (kv.num_blocks < 1)
      fail("serve", "--kv-cache-memory ", c.kv_cache_fraction, " of the available ",
           kv.mem_available, " bytes over ", ranks, " ranks (", kv.budget_bytes,
           " bytes each) holds no KV block of ", kv.block_bytes, " bytes");
  } else if (c.kv_cache_memory == 0) {
    // max_num_seqs full-length sequences, but not past kDefaultKvBytes per rank (a 70B model's
    // full-length sequences would take hundreds of GiB), and never less than one sequence.
    constexpr uint64_t kDefaultKvBytes = uint64_t{4} << 30;
    const int64_t cap = static_cast<int64_t>(kDefaultKvBytes / kv.block_bytes);
    kv.num_blocks = std::max(per_seq, std::min(per_seq * c.max_num_seqs, cap));
  } else {
    kv.budget_bytes = c.kv_cache_memory;
    kv.num_blocks = static_cast<int64_t>(c.kv_cache_memory / kv.block_bytes);
    if (kv.num_blocks < 1)
      fail("serve", "--kv-cache-memory ", c.kv_cache_memory, " bytes holds no KV block (",
           kv.block_bytes, " bytes each: ", layers, " layers x ", heads.kv_heads * mc.head_dim,
           " KV floats x 2 x 4 bytes x ", c.block_size, " positions)");
  }
  if (kv.num_blocks > (int64_t{1} << 31) - 1)
    fail("serve", "--kv-cache-memory gives ", kv.num_blocks, " blocks, more than int32 ids");
  return kv;
}

void parse_kv_cache_memory(const std::string& value, ServeConfig& c) {
  auto bad = [&](const std::string& why) {
    fail("serve", "--kv-cache-memory ", value, ": ", why,
         " (give bytes, e.g. 2147483648 or 2GiB or 512MiB, or a fraction of the available "
         "memory in (0, 1], e.g. 0.5)");
  };
  size_t i = 0;
  auto numeric = [&](char ch) {
    return std::isdigit(static_cast<unsigned char>(ch)) != 0 || ch == '.';
  };
  while (i < value.size() && numeric(value[i])) ++i;
  const std::string num = value.substr(0, i);
  std::string unit = value.substr(i);
  while (!unit.empty() && unit.front() == ' ') unit.erase(0, 1);
  if (num.empty() || num == "." || std::count(num.begin(), num.end(), '.') > 1)
    bad("not a number");
  const double x = std::stod(num);
  const bool has_point = num.find('.') != std::string::npos;
  if (unit.empty() && has_point) {  // a fraction of MemAvailable
    if (!(x > 0 && x <= 1)) bad("a fraction must be in (0, 1]");
    c.kv_cache_fraction = x;
    c.kv_cache_memory = 0;
    return;
  }
  std::string u;
  for (char ch : unit) u += static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  double scale = 0;
  const std::pair<const char*, double> units[] = {
      {"", 1},          {"B", 1},          {"K", 1024.0},     {"KIB", 1024.0},
      {"KB", 1e3},      {"M", 1048576.0},  {"MIB", 1048576.0}, {"MB", 1e6},
      {"G", 1073741824.0}, {"GIB", 1073741824.0}, {"GB", 1e9},
      {"T", 1099511627776.0}, {"TIB", 1099511627776.0}, {"TB", 1e12}};
  for (const auto& [name, f] : units)
    if (u == name) scale = f;
  if (scale == 0) bad("unknown unit '" + unit + "'");
  const double bytes = std::floor(x * scale);
  if (!(bytes >= 1)) bad("must be at least one byte");
  if (bytes > 1.8e19) bad("too large");
  c.kv_cache_memory = static_cast<uint64_t>(bytes);
  c.kv_cache_fraction = 0;
}

uint64_t mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream ss(line.substr(13));
    uint64_t kib = 0;
    std::string unit;
    if (ss >> kib >> unit && unit == "kB") return kib * 1024;
    break;
  }
  fail<std::runtime_error>("serve", "/proc/meminfo: no 'MemAvailable: N kB' line (needed by "
                           "--kv-cache-memory as a fraction; give bytes instead)");
}

std::unique_ptr<ServeEngine> make_serve_engine(const ServeConfig& config) {
  return std::make_unique<Engine>(config);
}

bool serve_process_is_root() { return comm::launched_rank() == 0; }

void run_serve_follower(const ServeConfig& config) {
  check_config(config);
  const KvLayout layout = serve_kv_layout(config);
  run_model(engine_options(config), [&](RankContext& ctx) {
    if (ctx.world.rank() == 0)
      fail("serve", "run_serve_follower on world rank 0: call make_serve_engine there");
    KvLayout kv = layout;
    agree_on_blocks(config, ctx.world, kv);
    const std::vector<comm::Group> links = front_links(config, ctx);
    const int d = ctx.mesh.dp_rank();
    if (ctx.mesh.tp_rank() == 0 && ctx.mesh.pp_rank() == 0 && d > 0) {
      // A replica's first rank: its scheduler is world rank 0's.
      run_serve_loop(ctx.model, ctx.mesh.tp(), ctx.mesh.pp(),
                     loop_config(config, kv, ctx.split_pp_hops), nullptr, nullptr, &links.at(d));
      return;
    }
    run_serve_loop(ctx.model, ctx.mesh.tp(), ctx.mesh.pp(),
                   loop_config(config, kv, ctx.split_pp_hops), nullptr);
  });
}

}  // namespace parallm::serve
