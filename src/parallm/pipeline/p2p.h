// Stage-to-stage transport of a pipeline: activations forward (a small integer header that says
// what the rows are, then the rows), per-micro-batch results (sampled tokens) back from the
// last stage to the first, and in training the activations' gradients backward. Every message is
// keyed by (micro-batch, model chunk): its tag is derived from the key, and each received
// activation lands in its own buffer, kept until the next message with the same key (or
// release()). So schedules that hold several micro-batches in flight on one stage (1F1B,
// interleaved; training keeps activations for the backward) never share a buffer, and a message
// cannot be taken for another key's.
//
// Over a PP group (one rank per stage, comm::Mesh::pp()): Group::send never waits for the receiver,
// so stages may send ahead in any order (schedule.h's rules); recv blocks until its key arrives.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "parallm/comm/group.h"

namespace parallm::pipeline {

// One received activation: the sender's header and its rows.
struct Activation {
  std::vector<int64_t> header;
  std::vector<float> data;
};

class StageLink {
 public:
  // pp: the pipeline group (rank = stage). max_header: the most header values a message carries
  // (every stage passes the same); chunks: model chunks per stage (v of interleaved schedules).
  StageLink(comm::Group pp, int max_header, int chunks = 1);

  // Activations replicated over `group` (a stage's TP group, in inference) cross in parts: each of
  // its ranks sends its 1/size block of the rows to the same rank of the next stage, and there the
  // group all-gathers them (Megatron-LM's scatter/gather of pipeline tensors). The link between
  // two stages then carries the rows once, not once per TP rank. Every stage sets the same size
  // (or none); a count the size does not divide crosses whole. Not for training, whose stage
  // outputs are not replicated under sequence parallelism.
  void split_over(comm::Group group);
  bool split() const { return split_.size() > 1; }

  // header: [n <= max_header], data: [count] -> stage `to`, under key (micro_batch, chunk).
  void send_activation(int to, int micro_batch, int chunk, const int64_t* header, int n,
                       const float* data, size_t count) const;
  // Waits for key (micro_batch, chunk) from stage `from`; the buffer is this key's own.
  Activation& recv_activation(int from, int micro_batch, int chunk);
  // Frees the buffer of key (micro_batch, chunk) once its rows are consumed (training copies
  // them into the micro-batch's state, so a stage need not hold every key's rows until the next
  // step). A later recv of the key allocates it again.
  void release(int micro_batch, int chunk);

  // Results of a micro-batch (e.g. sampled token ids), `count` known to both sides.
  void send_result(int to, int micro_batch, const int32_t* values, size_t count) const;
  void recv_result(int from, int micro_batch, int32_t* values, size_t count) const;

  // Training: the gradient of an activation, backward (`count` floats, known to both sides). Its
  // own tag kind, so a gradient never matches an activation of the same key, even between the two
  // stages of a two-stage pipeline, which send both ways.
  void send_grad(int to, int micro_batch, int chunk, const float* data, size_t count) const;
  void recv_grad(int from, int micro_batch, int chunk, float* data, size_t count) const;

  // Tags: kFirstTag + 4 * (micro_batch * chunks + chunk) + kind; kind 0 header, 1 rows, 2 result,
  // 3 gradient. Tags below kFirstTag are free for the caller's own messages on the same group.
  static constexpr int kFirstTag = 1000;
  int tag(int micro_batch, int chunk, int kind) const;

 private:
  // The rows of `count` this rank sends (and receives) split: count / parts, or 0 when they
  // cross whole (no split group, or a count it does not divide). Sender and receiver agree.
  size_t block(size_t count) const;

  comm::Group pp_;
  comm::Group split_;        // size 1: whole rows
  std::vector<float> part_;  // a received block before the all-gather
  int max_header_, chunks_;
  std::map<std::pair<int, int>, Activation> inbox_;  // (micro-batch, chunk) -> last received
};

}  // namespace parallm::pipeline
