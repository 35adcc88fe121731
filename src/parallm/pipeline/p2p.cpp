#include "parallm/pipeline/p2p.h"

#include <algorithm>

#include "parallm/core/error.h"

namespace parallm::pipeline {
namespace {
constexpr int kMaxTag = 32767;  // Group::send's tag range
}

StageLink::StageLink(comm::Group pp, int max_header, int chunks)
    : pp_(std::move(pp)), max_header_(max_header), chunks_(chunks) {
  if (max_header < 0 || chunks < 1)
    fail("pipeline", "stage link: max_header ", max_header, ", chunks ", chunks);
}

int StageLink::tag(int micro_batch, int chunk, int kind) const {
  if (micro_batch < 0 || chunk < 0 || chunk >= chunks_)
    fail("pipeline", "p2p key (micro-batch ", micro_batch, ", chunk ", chunk, ") out of range (",
         chunks_, " chunks)");
  const int64_t t = kFirstTag + 4 * (static_cast<int64_t>(micro_batch) * chunks_ + chunk) + kind;
  if (t > kMaxTag)
    fail("pipeline", "micro-batch ", micro_batch, " chunk ", chunk,
         " is past the p2p tag space (at most ", (kMaxTag - kFirstTag) / (4 * chunks_),
         " micro-batches with ", chunks_, " chunks)");
  return static_cast<int>(t);
}

void StageLink::split_over(comm::Group group) {
  split_ = std::move(group);
}

size_t StageLink::block(size_t count) const {
  const size_t parts = static_cast<size_t>(split_.size());
  return parts > 1 && count % parts == 0 ? count / parts : 0;
}

// Wire: message 0 is [n, count, header..., padding] of fixed size 2 + max_header (so the receiver
// knows its size); message 1 holds the `count` rows (skipped when 0), or with split_over this
// rank's block of them.
void StageLink::send_activation(int to, int micro_batch, int chunk, const int64_t* header, int n,
                                const float* data, size_t count) const {
  if (n < 0 || n > max_header_)
    fail("pipeline", "activation header of ", n, " values, the link carries at most ", max_header_);
  std::vector<int64_t> head(2 + max_header_, 0);
  head[0] = n;
  head[1] = static_cast<int64_t>(count);
  std::copy(header, header + n, head.begin() + 2);
  pp_.send(head.data(), head.size() * sizeof(int64_t), to, tag(micro_batch, chunk, 0));
  if (count == 0) return;
  if (const size_t b = block(count))
    pp_.send(data + b * split_.rank(), b * sizeof(float), to, tag(micro_batch, chunk, 1));
  else
    pp_.send(data, count * sizeof(float), to, tag(micro_batch, chunk, 1));
}

Activation& StageLink::recv_activation(int from, int micro_batch, int chunk) {
  std::vector<int64_t> head(2 + max_header_);
  pp_.recv(head.data(), head.size() * sizeof(int64_t), from, tag(micro_batch, chunk, 0));
  if (head[0] < 0 || head[0] > max_header_ || head[1] < 0)
    fail<std::runtime_error>("pipeline", "stage ", pp_.rank(),
                             ": bad activation header from stage ", from, " (", head[0],
                             " values, ", head[1], " rows)");
  Activation& a = inbox_[{micro_batch, chunk}];
  a.header.assign(head.begin() + 2, head.begin() + 2 + head[0]);
  a.data.resize(head[1]);
  const size_t count = a.data.size();
  if (const size_t b = block(count)) {
    part_.resize(b);
    pp_.recv(part_.data(), b * sizeof(float), from, tag(micro_batch, chunk, 1));
    split_.all_gather(part_.data(), a.data.data(), b, DType::F32);
  } else if (count > 0) {
    pp_.recv(a.data.data(), count * sizeof(float), from, tag(micro_batch, chunk, 1));
  }
  return a;
}

void StageLink::release(int micro_batch, int chunk) {
  inbox_.erase({micro_batch, chunk});
}

void StageLink::send_result(int to, int micro_batch, const int32_t* values, size_t count) const {
  pp_.send(values, count * sizeof(int32_t), to, tag(micro_batch, 0, 2));
}

void StageLink::recv_result(int from, int micro_batch, int32_t* values, size_t count) const {
  pp_.recv(values, count * sizeof(int32_t), from, tag(micro_batch, 0, 2));
}

void StageLink::send_grad(int to, int micro_batch, int chunk, const float* data,
                          size_t count) const {
  pp_.send(data, count * sizeof(float), to, tag(micro_batch, chunk, 3));
}

void StageLink::recv_grad(int from, int micro_batch, int chunk, float* data, size_t count) const {
  pp_.recv(data, count * sizeof(float), from, tag(micro_batch, chunk, 3));
}

}  // namespace parallm::pipeline
