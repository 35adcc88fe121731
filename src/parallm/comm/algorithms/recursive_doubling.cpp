// Latency-optimised collectives: recursive-doubling all-reduce (Thakur, Rabenseifner and Gropp,
// with the usual fold of the extra ranks when p is not a power of two), Bruck's all-gather, and a
// reduce-scatter built on the all-reduce.
#include <algorithm>
#include <cstring>
#include <vector>

#include "parallm/comm/algorithms/algorithms.h"
#include "parallm/comm/algorithms/reduce.h"

namespace parallm::comm::algorithms {
namespace {

// buf: [n] f32 -> the reduction over all ranks, bitwise the same on every rank: partners combine
// the same two operands (x op y == y op x for IEEE sum and max of non-NaN values).
void rd_f32(GroupImpl& g, float* buf, size_t n, ReduceOp op) {
  const int p = g.size(), r = g.rank();
  int pof2 = 1;
  while (pof2 * 2 <= p) pof2 *= 2;
  const int rem = p - pof2;  // ranks [0, 2 rem) pair up: the even one hands its data to the odd
  const size_t bytes = n * sizeof(float);
  std::vector<float> tmp(n);
  int vrank;
  if (r < 2 * rem) {
    if (r % 2 == 0) {
      g.coll_send(buf, bytes, r + 1);
      vrank = -1;
    } else {
      g.coll_recv(tmp.data(), bytes, r - 1);
      reduce_f32(buf, tmp.data(), n, op);
      vrank = r / 2;
    }
  } else {
    vrank = r - rem;
  }
  if (vrank >= 0) {
    for (int mask = 1; mask < pof2; mask <<= 1) {
      const int vpeer = vrank ^ mask;
      const int peer = vpeer < rem ? vpeer * 2 + 1 : vpeer + rem;
      g.coll_sendrecv(buf, bytes, peer, tmp.data(), bytes, peer);
      reduce_f32(buf, tmp.data(), n, op);
    }
  }
  if (r < 2 * rem) {
    if (r % 2 == 1)
      g.coll_send(buf, bytes, r - 1);
    else
      g.coll_recv(buf, bytes, r + 1);
  }
}

}  // namespace

void rd_all_reduce(GroupImpl& g, void* data, size_t count, DType dtype, ReduceOp op) {
  if (dtype == DType::F32) {
    rd_f32(g, static_cast<float*>(data), count, op);
    return;
  }
  std::vector<float> work(count);
  convert(data, dtype, work.data(), DType::F32, count);
  rd_f32(g, work.data(), count, op);
  convert(work.data(), DType::F32, data, dtype, count);
}

void rd_reduce_scatter(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype,
                       ReduceOp op) {
  const size_t total = count * g.size();
  std::vector<float> work(total);
  convert(send, dtype, work.data(), DType::F32, total);
  rd_f32(g, work.data(), total, op);
  convert(work.data() + g.rank() * count, DType::F32, recv, dtype, count);
}

void bruck_all_gather(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype) {
  const int p = g.size(), r = g.rank();
  const size_t bytes = count * dtype_size(dtype);
  // tmp block i holds rank (r + i) % p's block; after distance d, blocks [0, min(2d, p)) are here.
  std::vector<char> tmp(bytes * p);
  std::memcpy(tmp.data(), send, bytes);
  for (int d = 1; d < p; d <<= 1) {
    const int n = std::min(d, p - d);
    g.coll_sendrecv(tmp.data(), n * bytes, (r - d + p) % p, tmp.data() + d * bytes, n * bytes,
                    (r + d) % p);
  }
  char* out = static_cast<char*>(recv);
  for (int i = 0; i < p; ++i)
    std::memcpy(out + ((r + i) % p) * bytes, tmp.data() + i * bytes, bytes);
}

}  // namespace parallm::comm::algorithms
