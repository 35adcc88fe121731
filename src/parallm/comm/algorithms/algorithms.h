// Collectives written once over a GroupImpl's send/recv transport, so they run on every backend.
// All take the same arguments as the matching Group call and assume size() > 1 and count > 0.
//
// Costs per rank for p ranks and N bytes (alpha: per-message latency, beta: per-byte time):
//   ring all-reduce        2(p-1) alpha + 2(p-1)/p N beta   (reduce-scatter, then all-gather)
//   ring all-gather        (p-1) alpha + (p-1)/p N beta      (N: the gathered size)
//   ring reduce-scatter    (p-1) alpha + (p-1)/p N beta      (N: the input size)
//   recursive doubling     log2(p) alpha + log2(p) N beta    (+2 steps when p is not a power of 2)
//   Bruck all-gather       ceil(log2 p) alpha + (p-1)/p N beta
//   pairwise all-to-all    (p-1) alpha + sum of the blocks
//   binomial broadcast     ceil(log2 p) alpha + ceil(log2 p) N beta
// bf16/f16 reductions travel as f32 partial sums during the reduce phase (twice the bytes of the
// input there) so that they are rounded once, at the end: "f32 accumulation".
#pragma once

#include <cstddef>

#include "parallm/comm/group_impl.h"

namespace parallm::comm::algorithms {

void ring_all_reduce(GroupImpl& g, void* data, size_t count, DType dtype, ReduceOp op);
void ring_all_gather(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype);
void ring_reduce_scatter(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype,
                         ReduceOp op);

void rd_all_reduce(GroupImpl& g, void* data, size_t count, DType dtype, ReduceOp op);
// The latency-optimised all-gather (Bruck: works for any p).
void bruck_all_gather(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype);
// Latency-optimised reduce-scatter: a recursive-doubling all-reduce of the whole input, then keep
// this rank's block (more bytes, fewer messages: for small inputs only).
void rd_reduce_scatter(GroupImpl& g, const void* send, void* recv, size_t count, DType dtype,
                       ReduceOp op);

void pairwise_all_to_all(GroupImpl& g, const void* send, const size_t* send_counts, void* recv,
                         const size_t* recv_counts, DType dtype);
void binomial_broadcast(GroupImpl& g, void* data, size_t count, DType dtype, int root);

}  // namespace parallm::comm::algorithms
