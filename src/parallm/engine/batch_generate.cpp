#include "parallm/engine/batch_generate.h"

#include <algorithm>
#include <cstring>

#include "parallm/core/error.h"
#include "parallm/core/timer.h"
#include "parallm/core/trace.h"
#include "parallm/engine/kv_cache.h"
#include "parallm/pipeline/executor.h"
#include "parallm/pipeline/schedule.h"

namespace parallm {
namespace {

// Point-to-point tags: activations (header, then data) go forward; tokens come back.
constexpr int kTagHeader = 11, kTagData = 12, kTagTokens = 13;

bool is_eos(const ModelConfig& c, int32_t t) {
  return std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), t) != c.eos_token_ids.end();
}

}  // namespace

BatchResult generate_batch(const LlamaModel& model, const comm::Mesh& mesh,
                           const std::vector<std::vector<int32_t>>& prompts,
                           const BatchOptions& options) {
  const ModelConfig& c = model.config();
  const int B = static_cast<int>(prompts.size());
  if (B == 0) fail("generate", "no prompts");
  if (options.max_tokens < 1) fail("generate", "--max-tokens must be >= 1 for batched generation");
  int64_t longest = 0;
  for (int i = 0; i < B; ++i) {
    if (prompts[i].empty()) fail("generate", "prompt ", i + 1, " is empty");
    for (int32_t id : prompts[i])
      if (id < 0 || id >= c.vocab_size)
        fail("generate", "prompt ", i + 1, ": token id ", id, " is outside the vocabulary [0, ",
             c.vocab_size, ")");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(prompts[i].size()));
  }
  const int64_t capacity = longest + options.max_tokens;
  if (capacity > c.max_position_embeddings)
    fail("generate", "longest prompt (", longest, " tokens) + --max-tokens (", options.max_tokens,
         ") exceeds the model's max_position_embeddings ", c.max_position_embeddings);

  const int P = mesh.pp_size(), stage = mesh.pp_rank();
  const bool first = mesh.first_stage(), last = mesh.last_stage();
  const comm::Group& pp = mesh.pp();
  const comm::Group& tp = mesh.tp();
  const int M = std::min(options.micro_batches > 0 ? options.micro_batches : P, B);
  auto mb_begin = [&](int j) { return B * j / M; };
  auto mb_size = [&](int j) { return mb_begin(j + 1) - mb_begin(j); };
  const int max_mb = (B + M - 1) / M;
  const int64_t H = c.hidden_size;

  KvCache kv(model.local_layers(), B, capacity, model.local_kv_dim());
  int64_t max_step_tokens = 1;  // the largest micro-batch's prompts: its first step's tokens
  for (int j = 0; j < M; ++j) {
    int64_t n = 0;
    for (int i = mb_begin(j); i < mb_begin(j + 1); ++i) n += std::ssize(prompts[i]);
    max_step_tokens = std::max(max_step_tokens, n);
  }
  Workspace ws = model.make_workspace(max_step_tokens);
  std::vector<Sampler> samplers;
  if (last)
    for (int i = 0; i < B; ++i) samplers.emplace_back(options.sampling, tp);

  BatchResult result;
  result.micro_batches = M;
  result.sequences.resize(B);
  std::vector<int64_t> pos(B, 0);   // next position of each sequence
  std::vector<int32_t> next(B, 0);  // the token each sequence feeds next
  std::vector<char> active(B, 1);

  // Per micro-batch, what is in flight on this stage: the chunk header and activations.
  std::vector<int32_t> header(1 + 3 * max_mb);
  std::vector<SeqChunk> chunks;
  std::vector<float> x;
  std::vector<float> logits;
  std::vector<int32_t> feedback(2 * max_mb);  // (token, still active) per sequence of a micro-batch

  auto pack_header = [&] {
    header[0] = static_cast<int32_t>(chunks.size());
    for (size_t k = 0; k < chunks.size(); ++k) {
      header[1 + 3 * k] = chunks[k].slot;
      header[2 + 3 * k] = static_cast<int32_t>(chunks[k].start_pos);
      header[3 + 3 * k] = static_cast<int32_t>(chunks[k].n_tokens);
    }
  };
  auto unpack_header = [&] {
    chunks.resize(header[0]);
    for (size_t k = 0; k < chunks.size(); ++k)
      chunks[k] = {header[1 + 3 * k], header[2 + 3 * k], header[3 + 3 * k]};
  };
  auto tokens_in = [&] {
    int64_t t = 0;
    for (const SeqChunk& ch : chunks) t += ch.n_tokens;
    return t;
  };
  // Applies the last stage's decision for micro-batch j (tokens and stops) on the first stage.
  auto apply_feedback = [&](int j) {
    for (int k = 0; k < mb_size(j); ++k) {
      const int i = mb_begin(j) + k;
      if (!active[i]) continue;
      const int32_t tok = feedback[2 * k];
      result.sequences[i].tokens.push_back(tok);
      next[i] = tok;
      active[i] = feedback[2 * k + 1];
    }
  };

  const pipeline::Schedule schedule = pipeline::gpipe(P, M, /*forward_only=*/true);
  pp.barrier();
  const double t0 = now_seconds();
  double busy = 0;
  for (int64_t step = 0; step < options.max_tokens; ++step) {
    pipeline::StageCallbacks cb;
    cb.recv_activation = [&](int j, int) {
      pp.recv(header.data(), header.size() * sizeof(int32_t), stage - 1, kTagHeader);
      unpack_header();
      x.resize(tokens_in() * H);
      if (!x.empty()) pp.recv(x.data(), x.size() * sizeof(float), stage - 1, kTagData);
    };
    cb.send_activation = [&](int j, int) {
      pack_header();
      pp.send(header.data(), header.size() * sizeof(int32_t), stage + 1, kTagHeader);
      if (!x.empty()) pp.send(x.data(), x.size() * sizeof(float), stage + 1, kTagData);
    };
    cb.forward = [&](int j, int) {
      if (first) {
        if (step > 0 && P > 1) {
          TraceSpan wait("recv tokens", "wait");
          pp.recv(feedback.data(), 2 * mb_size(j) * sizeof(int32_t), P - 1, kTagTokens);
          apply_feedback(j);
        }
        chunks.clear();
        std::vector<int32_t> ids;
        for (int i = mb_begin(j); i < mb_begin(j + 1); ++i) {
          if (!active[i]) continue;
          if (step == 0) {
            chunks.push_back({i, 0, static_cast<int64_t>(prompts[i].size())});
            ids.insert(ids.end(), prompts[i].begin(), prompts[i].end());
          } else {
            chunks.push_back({i, pos[i], 1});
            ids.push_back(next[i]);
          }
          pos[i] += chunks.back().n_tokens;
        }
        x.resize(ids.size() * H);
        const double b = now_seconds();
        if (!ids.empty()) {
          TraceSpan span("embed", "compute");
          model.embed(ids.data(), static_cast<int64_t>(ids.size()), x.data());
        }
        busy += now_seconds() - b;
      }
      const double b = now_seconds();
      if (!chunks.empty()) model.forward_layers(x.data(), chunks, kv, ws);
      if (last) {
        // One row of logits per sequence: its chunk's last token.
        TraceSpan span("head+sample", "compute");
        const int64_t V = model.vocab_shard().size();
        std::vector<float> rows(chunks.size() * H);
        int64_t off = 0;
        for (size_t k = 0; k < chunks.size(); ++k) {
          off += chunks[k].n_tokens;
          std::memcpy(rows.data() + k * H, x.data() + (off - 1) * H, H * sizeof(float));
        }
        logits.resize(chunks.size() * V);
        if (!chunks.empty())
          model.head(rows.data(), static_cast<int64_t>(chunks.size()), logits.data());
        std::fill(feedback.begin(), feedback.end(), 0);
        for (size_t k = 0; k < chunks.size(); ++k) {
          const int i = chunks[k].slot;
          const float* row = logits.data() + k * V;
          if (options.collect_logits)
            result.sequences[i].logits.push_back(gather_vocab(row, model.vocab_shard(), tp));
          const int32_t tok =
              samplers[i].sample(row, model.vocab_shard().begin, model.vocab_shard().end);
          // A sequence yields one token per step until it stops, so this is its (step+1)-th.
          bool stop = step + 1 >= options.max_tokens;
          if (is_eos(c, tok) && !options.ignore_eos) {
            stop = true;
            result.sequences[i].stopped_at_eos = true;
          }
          const int kk = i - mb_begin(j);
          feedback[2 * kk] = tok;
          feedback[2 * kk + 1] = stop ? 0 : 1;
        }
        if (P > 1) {
          pp.send(feedback.data(), 2 * mb_size(j) * sizeof(int32_t), 0, kTagTokens);
          // The last stage keeps its own record too (for logits and the output of tests).
          for (size_t k = 0; k < chunks.size(); ++k) {
            const int i = chunks[k].slot;
            const int kk = i - mb_begin(j);
            result.sequences[i].tokens.push_back(feedback[2 * kk]);
          }
        } else {
          apply_feedback(j);
        }
      }
      busy += now_seconds() - b;
    };
    pipeline::execute_stage(schedule, stage, cb);
    if (step == 0) {
      result.prefill_busy_seconds = busy;
      // The prompt pass ends when the last stage has sampled its last micro-batch.
      float end = last ? static_cast<float>(now_seconds() - t0) : 0.0f;
      // (Every rank learns it; one small all-reduce per run.)
      mesh.world().all_reduce(&end, 1, comm::ReduceOp::Max);
      result.prefill_seconds = end;
    }
  }
  if (first && P > 1) {
    // The tokens of the final step.
    for (int j = 0; j < M; ++j) {
      pp.recv(feedback.data(), 2 * mb_size(j) * sizeof(int32_t), P - 1, kTagTokens);
      apply_feedback(j);
    }
  }
  result.seconds = now_seconds() - t0;
  result.busy_seconds = busy;
  return result;
}

}  // namespace parallm
