// ServeEngine: the serving side of the generation loop, as the HTTP server (src/parallm/server/)
// sees it. Requests arrive at any time from any thread (submit), join the running batch at the
// next step (continuous batching, iteration-level scheduling as Orca and vLLM), stream their
// tokens back through callbacks, and leave at EOS, at their max_tokens, or when cancelled (a
// client that disconnects, or a stop string the server found in the text).
//
// The engine knows tokens only: the server tokenizes, detokenizes, renders chat templates and
// finds stop strings. The engine owns the scheduler (on world rank 0), the paged KV cache and the
// ranks that follow rank 0's step plans (TP x PP, DP replicas).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace parallm::serve {

// Per-request generation parameters (OpenAI's names, already validated by the server; the
// engine validates again and throws std::invalid_argument naming the parameter).
struct GenParams {
  int64_t max_tokens = 16;    // tokens to generate, >= 1
  float temperature = 1.0f;   // 0: greedy
  float top_p = 1.0f;         // 1: off
  int top_k = 0;              // 0: off
  uint64_t seed = 0;          // the request's own generator: same seed, same tokens at any load
  int top_logprobs = -1;      // -1: no logprobs; 0..20: the sampled token's logprob and this many
  bool ignore_eos = false;
  // The logprobs of the prompt's tokens (each under its prefix; top_logprobs >= 0 gives the top
  // list's length) through on_prompt_logprobs, before any token. Such a request computes its
  // whole prompt (no prefix-cache hits) and may ask max_tokens 0 (the prompt only).
  bool prompt_logprobs = false;
};

struct Submission {
  std::vector<int32_t> prompt;  // token ids, used exactly as given (the server adds BOS or not)
  GenParams params;
};

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;  // natural log of the probability under the model's softmax (temperature 1)
};

// One generated token. Callbacks run on the engine's thread: they must not block (the server
// pushes the event into the request's queue and returns).
struct TokenEvent {
  int32_t token = 0;
  float logprob = 0;               // when top_logprobs >= 0
  std::vector<TokenLogprob> top;   // top_logprobs entries, most likely first
};

enum class FinishReason {
  Stop,       // an EOS token (not included in the tokens reported)
  Length,     // max_tokens reached
  Cancelled,  // cancel() was called
  Error,      // the engine failed; FinishEvent::error says why
};

struct FinishEvent {
  FinishReason reason = FinishReason::Length;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;  // tokens reported through on_token
  std::string error;
};

struct RequestCallbacks {
  // With GenParams::prompt_logprobs, once, before the first token: entry i - 1 for prompt token
  // i >= 1 (token, its logprob given tokens 0..i-1, the top list). Not called for a 1-token
  // prompt or a request that ends before its prompt was computed.
  std::function<void(const std::vector<TokenEvent>&)> on_prompt_logprobs;
  std::function<void(const TokenEvent&)> on_token;
  std::function<void(const FinishEvent&)> on_finish;  // exactly once, last
};

// Thrown by submit() when the waiting queue is full (the server answers 429).
class QueueFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct EngineStats {
  int64_t running = 0;  // sequences in the running batch
  // The most sequences one batch held at once since the engine started (DP: the largest of the
  // replicas'). Tests read it to see that requests ran together without racing to sample
  // `running` at the right moment.
  int64_t running_peak = 0;
  int64_t waiting = 0;  // admitted to the queue, not yet running (preempted ones included)
  int64_t kv_blocks_total = 0, kv_blocks_used = 0;
  double kv_usage = 0;  // used / total, 0..1
  int64_t prompt_tokens_total = 0;      // prompt tokens computed (prefix-cache hits excluded)
  int64_t generation_tokens_total = 0;  // tokens sampled
  int64_t preemptions_total = 0;
  int64_t prefix_cache_queries_total = 0;  // prompt blocks looked up
  int64_t prefix_cache_hits_total = 0;     // of those, found in the cache
  int64_t requests_finished_total = 0;
};

struct ModelInfo {
  std::string name;           // served model name (--served-model-name, else the directory name)
  int64_t max_model_len = 0;  // prompt + max_tokens must fit
  int32_t vocab_size = 0;
};

class ServeEngine {
 public:
  virtual ~ServeEngine() = default;

  // Queues a request; returns its id at once. Throws std::invalid_argument (prompt empty, ids out
  // of the vocabulary, prompt + max_tokens over max_model_len, bad params: the message names the
  // parameter) or QueueFull. Thread-safe.
  virtual uint64_t submit(Submission s, RequestCallbacks cb) = 0;
  // Ends a request at once: it leaves the batch at the next step and its KV blocks are freed;
  // on_finish(Cancelled) follows unless it had already finished. Thread-safe; unknown ids ignored.
  virtual void cancel(uint64_t id) = 0;
  virtual EngineStats stats() const = 0;  // thread-safe snapshot
  virtual const ModelInfo& info() const = 0;
  virtual bool ready() const = 0;  // the model is loaded on every rank and the loop runs
  // Ends the loop on every rank (an explicit stop message to the followers); running requests
  // finish with Cancelled. Returns when every rank has left. Idempotent.
  virtual void shutdown() = 0;
  // Why the engine stopped serving (loading failed, a rank failed), empty while it serves or
  // after a clean shutdown. ready() is false once it is set. (Not pure: fakes need not define it.)
  virtual std::string failure() const { return {}; }
};

// What `parallm serve` passes to the engine (vLLM's flag names in the comments).
struct ServeConfig {
  std::string model;              // directory, .safetensors or llama2.c .bin
  std::string served_model_name;  // --served-model-name; empty: the model's file/directory name
  int tp = 1;                     // --tensor-parallel-size
  int pp = 1;                     // --pipeline-parallel-size
  int dp = 1;                     // --data-parallel-size: replicas (threads, or under mpirun)
  std::vector<int64_t> pp_layers;  // explicit layers per stage, else even
  // --enable-expert-parallel (MoE): whole experts over each replica's TP ranks, attention and the
  // LM head TP-split (EngineOptions::enable_expert_parallel).
  bool enable_expert_parallel = false;
  int threads = 0;                 // threads per rank; 0: the machine's cores / ranks here
  std::string dtype = "auto";      // weights: auto, f32, bf16, f16
  std::string backend = "auto";    // comm: auto (mpi under mpirun), local, mpi
  double comm_timeout_s = 300;
  std::string pp_split = "auto";          // --pp-split (EngineOptions::pp_split)
  int max_num_seqs = 64;                  // --max-num-seqs: running sequences per replica
  int64_t max_num_batched_tokens = 512;   // --max-num-batched-tokens: tokens per micro-batch
  int64_t block_size = 16;                // --block-size: positions per KV block
  // --kv-cache-memory: bytes of KV cache per rank (the stage with the most layers decides the
  // block count); 0: enough for max_num_seqs sequences of max_model_len, capped at 4 GiB per
  // rank (but at least one such sequence). parse_kv_cache_memory() sets it or the fraction.
  uint64_t kv_cache_memory = 0;
  // --kv-cache-memory 0.5: this fraction of the machine's available memory (MemAvailable in
  // /proc/meminfo, read at startup), shared evenly by the ranks on this machine (vLLM's
  // --gpu-memory-utilization, for the host's memory). 0: unset (kv_cache_memory decides).
  double kv_cache_fraction = 0;
  bool enable_prefix_caching = false;     // --enable-prefix-caching
  int64_t max_model_len = 0;              // --max-model-len; 0: max_position_embeddings
  int64_t max_waiting = 1024;             // waiting requests before submit() throws QueueFull
  double idle_tick_s = 0.5;  // when idle, rank 0 still sends an empty plan this often
};

// The KV layout a config gives (every rank computes the same): blocks of block_size positions,
// each kv_block_bytes on the rank with the most layers.
struct KvLayout {
  int64_t num_blocks = 0;
  uint64_t block_bytes = 0;
  int64_t max_model_len = 0;
  uint64_t mem_available = 0;  // with kv_cache_fraction: MemAvailable read (bytes)
  uint64_t budget_bytes = 0;   // the per-rank budget the blocks were cut from (0: the default)
};

// --kv-cache-memory VALUE into `config`: bytes ("1073741824"), bytes with a unit ("512MiB",
// "2GiB", "1.5GB"; K/M/G/T and KiB.. are powers of 1024, KB/MB/GB/TB of 1000, B bytes), or a
// fraction of the available memory (a number with a decimal point in (0, 1], e.g. "0.5").
// Throws std::invalid_argument "--kv-cache-memory VALUE: why" for anything else.
void parse_kv_cache_memory(const std::string& value, ServeConfig& config);
// MemAvailable from /proc/meminfo in bytes; throws std::runtime_error when it cannot be read.
uint64_t mem_available_bytes();
// Throws std::invalid_argument naming the flag when the config cannot serve the model.
KvLayout serve_kv_layout(const ServeConfig& config);

// Starts the engine: returns at once (ready() turns true once every replica's first rank runs its
// loop). Without mpirun every rank is a thread of this process. Under mpirun call it in world
// rank 0's process only (serve_process_is_root()); the other processes call run_serve_follower
// with the same config. Throws std::invalid_argument for a bad config (before starting anything).
std::unique_ptr<ServeEngine> make_serve_engine(const ServeConfig& config);
// Under mpirun: whether this process is world rank 0 (the one that serves HTTP).
bool serve_process_is_root();
// Under mpirun, on every process but world rank 0: loads this rank's shard and follows rank 0's
// plans; returns when rank 0 shuts the engine down (its exit message). Throws on failure.
void run_serve_follower(const ServeConfig& config);

}  // namespace parallm::serve
