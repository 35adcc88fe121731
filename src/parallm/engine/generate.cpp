#include "parallm/engine/generate.h"

#include <algorithm>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/timer.h"
#include "parallm/engine/kv_cache.h"

namespace parallm {

// Moved to parallel::VocabExchange::gather_row (the LM head's gather_logits); this forwarder stays
// only until batch_generate calls the LM head.
std::vector<float> gather_vocab(const float* local, const parallel::ShardSpec& shard,
                                const comm::Group& tp) {
  return parallel::VocabExchange(tp).gather_row(local, shard);
}

GenerateResult generate(const LlamaModel& model, comm::Group tp, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  const ModelConfig& c = model.config();
  if (!model.has_embedding() || !model.has_head())
    fail("generate", "this model holds layers [", model.layer_begin(), ", ", model.layer_end(),
         "), not the whole model; pipeline stages run through the pipeline executor");
  if (prompt.empty()) fail("generate", "the prompt is empty (give --prompt or --prompt-ids)");
  if (options.max_tokens < 0)
    fail("generate", "--max-tokens must be >= 0, got ", options.max_tokens);
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + options.max_tokens;
  if (capacity > c.max_position_embeddings)
    fail("generate", "prompt (", prompt.size(), " tokens) + --max-tokens (", options.max_tokens,
         ") exceeds the model's max_position_embeddings ", c.max_position_embeddings);

  KvCache kv(model.local_layers(), 1, capacity, model.local_kv_dim());
  Workspace ws = model.make_workspace(static_cast<int64_t>(prompt.size()));
  Sampler sampler(options.sampling, tp);
  const auto& vocab = model.vocab_shard();
  const int64_t H = c.hidden_size;
  GenerateResult result;
  if (options.max_tokens == 0) return result;

  std::vector<float> x(prompt.size() * H), logits(vocab.size());
  auto step = [&](const int32_t* ids, int64_t T, int64_t pos) {
    model.embed(ids, T, x.data());
    model.forward_layers(x.data(), {SeqChunk{0, pos, T}}, kv, ws);
    model.head(x.data() + (T - 1) * H, 1, logits.data());  // only the last token's logits
    if (options.collect_logits) result.logits.push_back(gather_vocab(logits.data(), vocab, tp));
    return sampler.sample(logits.data(), vocab.begin, vocab.end);
  };

  Timer timer;
  int32_t token = step(prompt.data(), static_cast<int64_t>(prompt.size()), 0);
  result.prefill_seconds = timer.seconds();
  timer.reset();
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (;;) {
    result.tokens.push_back(token);
    if (on_token) on_token(token);
    const bool eos =
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) != c.eos_token_ids.end();
    if (eos && !options.ignore_eos) {
      result.stopped_at_eos = true;
      break;
    }
    if (static_cast<int64_t>(result.tokens.size()) >= options.max_tokens) break;
    token = step(&token, 1, pos++);
  }
  result.decode_seconds = timer.seconds();
  return result;
}

}  // namespace parallm
