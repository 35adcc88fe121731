// Ring all-reduce, all-gather and reduce-scatter over send/recv (Patarasuk and Yuan; as in gloo's
// allreduce_ring and NCCL's ring). Ranks pass blocks to (rank + 1) and take them from (rank - 1).
#include <cstring>
#include <memory>
#include <vector>

#include "parallm/comm/algorithms/algorithms.h"
#include "parallm/comm/algorithms/reduce.h"

namespace parallm::comm::algorithms {
namespace {

int mod(int a, int p) {
  return ((a % p) + p) % p;
}

// Receive scratch, kept per thread between calls instead of allocating, zeroing and faulting in a
// block-sized buffer on every call.
float* scratch_floats(size_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local size_t capacity = 0;
  if (n > capacity) {
    buf.reset(new float[n]);
    capacity = n;
  }
  return buf.get();
}

// buf: [count] f32, this rank's contribution. After: block rank() of `count` split into size()
// blocks holds the reduction over all ranks (other blocks hold partial sums).
// Step s sends block (r - s - 1) and receives block (r - s - 2), which the previous rank has
// reduced over s + 1 contributions; after p - 1 steps block r has all p.
void reduce_scatter_in_place_f32(GroupImpl& g, float* buf, size_t count, ReduceOp op) {
  const int p = g.size(), r = g.rank(), next = mod(r + 1, p), prev = mod(r - 1, p);
  float* tmp = scratch_floats(count / p + 1);
  for (int s = 0; s < p - 1; ++s) {
    const int send_block = mod(r - s - 1, p), recv_block = mod(r - s - 2, p);
    const size_t sb = block_begin(count, p, send_block), se = block_begin(count, p, send_block + 1);
    const size_t rb = block_begin(count, p, recv_block), re = block_begin(count, p, recv_block + 1);
    g.coll_sendrecv(buf + sb, (se - sb) * sizeof(float), next, tmp, (re - rb) * sizeof(float),
                    prev);
    reduce_f32(buf + rb, tmp, re - rb, op);
  }
}

// buf: [count] elements of `elem` bytes, block rank() valid. After: every block valid.
void all_gather_in_place(GroupImpl& g, void* buf, size_t count, size_t elem) {
  const int p = g.size(), r = g.rank(), next = mod(r + 1, p), prev = mod(r - 1, p);
  char* b = static_cast<char*>(buf);
  for (int s = 0; s < p - 1; ++s) {
    const int send_block = mod(r - s, p), recv_block = mod(r - s - 1, p);
    const size_t sb = block_begin(count, p, send_block), se = block_begin(count, p, send_block + 1);
    const size_t rb = block_begin(count, p, recv_block), re = block_begin(count, p, recv_block + 1);
    g.coll_sendrecv(b + sb * elem, (se - sb) * elem, next, b + rb * elem, (re - rb) * elem, prev);
  }
}

}  // namespace

void ring_all_reduce(GroupImpl& g, void* data, size_t count, DType dtype, ReduceOp op) {
  const int p = g.size(), r = g.rank();
  const size_t elem = dtype_size(dtype);
  if (dtype == DType::F32) {
    reduce_scatter_in_place_f32(g, static_cast<float*>(data), count, op);
  } else {
    // Partial sums travel as f32; this rank's reduced block is rounded once into `data`.
    std::vector<float> work(count);
    convert(data, dtype, work.data(), DType::F32, count);
    reduce_scatter_in_place_f32(g, work.data(), count, op);
    const size_t b = block_begin(count, p, r), e = block_begin(count, p, r + 1);
    convert(work.data() + b, DType::F32, static_cast<char*>(data) + b * elem, dtype, e - b);
  }
  all_gather_in_place(g, data, count, elem);
}

void ring_all_gather(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype) {
  const size_t bytes = count * dtype_size(dtype);
  char* own = static_cast<char*>(recv) + g.rank() * bytes;
  if (own != send) std::memmove(own, send, bytes);
  all_gather_in_place(g, recv, count * g.size(), dtype_size(dtype));
}

void ring_reduce_scatter(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype,
                         ReduceOp op) {
  const size_t total = count * g.size();
  std::vector<float> work(total);
  convert(send, dtype, work.data(), DType::F32, total);
  // `total` splits into size() blocks of exactly `count`, so block rank() is this rank's output.
  reduce_scatter_in_place_f32(g, work.data(), total, op);
  convert(work.data() + g.rank() * count, DType::F32, recv, dtype, count);
}

}  // namespace parallm::comm::algorithms
