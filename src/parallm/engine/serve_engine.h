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
};

}  // namespace parallm::serve
