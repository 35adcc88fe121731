// Test doubles for the HTTP server: a ServeEngine that "generates" a fixed reply (deterministic
// tokens, no model), and a small tokenizer.json + tokenizer_config.json written to a directory.
// Used by test_server and by parallm_fake_server (the npm client test's target).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "llama_tokenizer_json.h"
#include "parallm/engine/serve_engine.h"
#include "parallm/model/tokenizer.h"

namespace parallm::testing {

// The reply every request gets, token by token (then EOS): multi-character pieces, byte-fallback
// characters (é, 🙂) split over several tokens, words a stop string can straddle.
inline const char* kReplyText =
    "Once upon a time, there was a tiny robot named Bo. Bo liked the caf\xC3\xA9 \xF0\x9F\x99\x82 "
    "and said hello world to everyone. The end.";

// Writes tokenizer.json (sentencepiece-style BPE with byte fallback: <unk> 0, <s> 1, </s> 2,
// <|im_start|> 3, <|im_end|> 4, bytes 5..260, then single characters and whole words built by
// merges) and, when `chat_template` is given, tokenizer_config.json with it.
inline void write_test_model(const std::filesystem::path& dir, const std::string& chat_template) {
  using nlohmann::json;
  const std::string& meta = kSpmSpace;
  json vocab = json::object();
  json added = json::array();
  const char* specials[] = {"<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"};
  int next = 0;
  for (const char* s : specials) {
    added.push_back(special_added_token(next, s));
    vocab[s] = next++;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = next++;
  }
  auto add = [&](const std::string& piece) {
    if (!vocab.contains(piece)) vocab[piece] = next++;
  };
  add(meta);
  for (char c = 33; c < 127; ++c) add(std::string(1, c));
  json merges = json::array();
  std::set<std::string> seen;
  const char* words[] = {"Once",     "upon", "a",     "time", "there", "was",   "tiny",  "robot",
                         "named",    "Bo",   "liked", "the",  "said",  "hello", "world", "to",
                         "everyone", "The",  "end",   "and",  "Hello", "story"};
  for (const char* w : words) {
    std::string prefix = meta;
    for (const char* p = w; *p; ++p) {
      const std::string m = prefix + " " + std::string(1, *p);
      if (seen.insert(m).second) merges.push_back(m);
      prefix += *p;
      add(prefix);
    }
  }
  const json j = llama_style_tokenizer_json(added, vocab, merges);
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << j.dump(1);
  if (!chat_template.empty()) {
    json cfg = {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"chat_template", chat_template}};
    std::ofstream(dir / "tokenizer_config.json") << cfg.dump(1);
  }
}

inline const char* kChatmlTemplate =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\\n' }}{% endif %}";

// Emits `reply` one token per step for every running request, then EOS (FinishReason::Stop);
// max_tokens ends it with Length; cancel() with Cancelled at the next step. Logprobs are made
// up but deterministic: token i has logprob -0.25 * (i % 4 + 1), its top list is the token
// itself then the next ids.
class FakeEngine : public serve::ServeEngine {
 public:
  FakeEngine(std::vector<int32_t> reply, int32_t vocab, int64_t max_model_len,
             std::string name = "fake-model")
      : reply_(std::move(reply)), vocab_(vocab) {
    info_.name = std::move(name);
    info_.max_model_len = max_model_len;
    info_.vocab_size = vocab;
    thread_ = std::thread([this] { loop(); });
  }
  ~FakeEngine() override { shutdown(); }

  uint64_t submit(serve::Submission s, serve::RequestCallbacks cb) override {
    if (s.prompt.empty()) throw std::invalid_argument("prompt: empty");
    for (int32_t id : s.prompt)
      if (id < 0 || id >= vocab_) throw std::invalid_argument("prompt: id out of the vocabulary");
    if (s.params.max_tokens < 1) throw std::invalid_argument("max_tokens: must be >= 1");
    if (static_cast<int64_t>(s.prompt.size()) + s.params.max_tokens > info_.max_model_len)
      throw std::invalid_argument("max_tokens: prompt + max_tokens over max_model_len");
    std::lock_guard<std::mutex> lock(mu_);
    if (queue_full) throw serve::QueueFull("fake queue full");
    const uint64_t id = next_id_++;
    last_prompt_ = s.prompt;
    last_params_ = s.params;
    reqs_[id] = Req{std::move(s), std::move(cb)};
    ++submitted;
    return id;
  }
  void cancel(uint64_t id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = reqs_.find(id);
    if (it != reqs_.end() && !it->second.cancelled) {
      it->second.cancelled = true;
      ++cancelled;
    }
  }
  serve::EngineStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    serve::EngineStats s;
    s.running = static_cast<int64_t>(reqs_.size());
    s.kv_blocks_total = 64;
    s.kv_blocks_used = s.running;
    s.kv_usage = static_cast<double>(s.running) / 64.0;
    s.generation_tokens_total = generated_;
    s.prompt_tokens_total = prompt_tokens_;
    return s;
  }
  const serve::ModelInfo& info() const override { return info_; }
  bool ready() const override { return ready_flag; }
  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;
      stop_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }

  std::atomic<bool> ready_flag{true};
  std::atomic<int> step_us{1000};
  std::atomic<int> fail_after{
      -1};                  // >= 0: the request fails (FinishReason::Error) after this many tokens
  std::atomic<bool> queue_full{false};
  std::atomic<int> submitted{0}, cancelled{0};
  // The last submission's prompt and parameters (under the lock: httplib threads write them).
  std::vector<int32_t> last_prompt() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_prompt_;
  }
  serve::GenParams last_params() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_params_;
  }
  int64_t running() const { return stats().running; }
  const std::vector<int32_t>& reply() const { return reply_; }

 private:
  struct Req {
    serve::Submission sub;
    serve::RequestCallbacks cb;
    int64_t produced = 0;
    bool cancelled = false;
  };

  void loop() {
    while (true) {
      std::vector<std::function<void()>> calls;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) {
          for (auto& [id, r] : reqs_) {
            auto cb = r.cb;
            calls.push_back([cb] { cb.on_finish({serve::FinishReason::Cancelled, 0, 0, ""}); });
          }
          reqs_.clear();
        }
        for (auto it = reqs_.begin(); it != reqs_.end();) {
          Req& r = it->second;
          const int64_t plen = static_cast<int64_t>(r.sub.prompt.size());
          auto cb = r.cb;
          if (r.cancelled) {
            serve::FinishEvent f{serve::FinishReason::Cancelled, plen, r.produced, ""};
            calls.push_back([cb, f] { cb.on_finish(f); });
            it = reqs_.erase(it);
            continue;
          }
          if (r.produced == 0) prompt_tokens_ += plen;
          const int fa = fail_after.load();
          if (fa >= 0 && r.produced >= fa) {
            serve::FinishEvent f{serve::FinishReason::Error, plen, r.produced, "fake failure"};
            calls.push_back([cb, f] { cb.on_finish(f); });
            it = reqs_.erase(it);
            continue;
          }
          const size_t i = static_cast<size_t>(r.produced);
          if (i >= reply_.size() && !r.sub.params.ignore_eos) {
            serve::FinishEvent f{serve::FinishReason::Stop, plen, r.produced, ""};
            calls.push_back([cb, f] { cb.on_finish(f); });
            it = reqs_.erase(it);
            continue;
          }
          serve::TokenEvent ev;
          ev.token = reply_[i % reply_.size()];
          if (r.sub.params.top_logprobs >= 0) {
            ev.logprob = -0.25f * static_cast<float>(i % 4 + 1);
            for (int k = 0; k < r.sub.params.top_logprobs; ++k)
              ev.top.push_back({(ev.token + k) % vocab_, ev.logprob - static_cast<float>(k)});
          }
          ++r.produced;
          ++generated_;
          calls.push_back([cb, ev] { cb.on_token(ev); });
          if (r.produced >= r.sub.params.max_tokens) {
            serve::FinishEvent f{serve::FinishReason::Length, plen, r.produced, ""};
            calls.push_back([cb, f] { cb.on_finish(f); });
            it = reqs_.erase(it);
            continue;
          }
          ++it;
        }
      }
      for (auto& c : calls) c();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_ && reqs_.empty()) return;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(step_us.load()));
    }
  }

  std::vector<int32_t> reply_;
  int32_t vocab_;
  serve::ModelInfo info_;
  mutable std::mutex mu_;
  std::map<uint64_t, Req> reqs_;
  std::vector<int32_t> last_prompt_;
  serve::GenParams last_params_;
  uint64_t next_id_ = 1;
  int64_t generated_ = 0, prompt_tokens_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace parallm::testing
