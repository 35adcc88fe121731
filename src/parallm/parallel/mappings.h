// The tensor-parallel mappings, named and paired as in Megatron-LM's tensor_parallel/mappings.py:
// each moves f32 activations between "replicated on every rank of the TP group" and "split over
// the group" (or "partial sums on every rank"), and each has its backward, the conjugate move of
// the gradient:
//
//   mapping                      forward                         backward
//   copy_to_region               identity                        all-reduce (sum)
//   reduce_from_region           all-reduce (sum)                identity
//   scatter_to_region            keep this rank's slice of cols  all-gather along cols
//   gather_from_region           all-gather along cols           keep this rank's slice of cols
//   gather_from_sequence         all-gather along rows           reduce-scatter (sum) along rows
//   reduce_scatter_to_sequence   reduce-scatter (sum) along rows all-gather along rows
//
// So backward(copy) == forward(reduce), backward(scatter) == forward(gather), backward(gather) ==
// forward(scatter), backward(gather_from_sequence) == forward(reduce_scatter_to_sequence) and the
// reverse (tests/parallel/mappings_test.cpp checks each pair bitwise).
//
// Layout: every tensor is f32, row-major [rows, cols]; rows are tokens, cols are features. The
// split of a dimension of size n over a group of p ranks is the near-even one of
// ShardSpec::even(n, p, rank) (rank r owns [n*r/p, n*(r+1)/p)), so sizes that p does not divide
// work, along cols (an FFN of 172 at TP 8) and along rows (a prompt of 7 tokens at TP 3): the
// uneven collectives pad every rank's block to ShardSpec::max_size and drop the padding after, so
// an uneven split costs one extra copy, never an error. The even case goes straight through.
//
// On the size-1 group every mapping is the identity (or a copy between distinct buffers); no
// mapping calls a collective there. Every rank of the group must make the same call with the same
// rows and cols (the full sizes, never the local ones).
//
// Scratch: the gathers along cols, and any mapping on an uneven split of rows, need a staging
// buffer. Pass `scratch` with at least the count that the matching *_scratch() function returns
// (in floats) to keep allocations out of a hot loop; a null scratch makes the call allocate.
#pragma once

#include <cstdint>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/parallel/shard.h"

namespace parallm::parallel {

// This rank's part of a dimension of `full` split over `group` (ShardSpec::even).
ShardSpec shard_of(int64_t full, const comm::Group& group);

// ---- copy_to_region: replicated input entering a column-parallel region ----
// Forward: identity (x is left as it is; nothing to do, kept so that code reads as Megatron's).
void copy_to_region_forward(const comm::Group& group, float* x, int64_t rows, int64_t cols);
// Backward: dx [rows, cols] partial gradients -> summed over the group, in place (all-reduce).
void copy_to_region_backward(const comm::Group& group, float* dx, int64_t rows, int64_t cols);

// ---- reduce_from_region: partial sums leaving a row-parallel region ----
// Forward: x [rows, cols] partial sums -> summed over the group, in place (all-reduce).
void reduce_from_region_forward(const comm::Group& group, float* x, int64_t rows, int64_t cols);
// Backward: identity.
void reduce_from_region_backward(const comm::Group& group, float* dx, int64_t rows, int64_t cols);

// ---- scatter_to_region: replicated -> split along cols ----
// Forward: x [rows, cols] -> y [rows, shard_of(cols).size()], this rank's columns (no
// communication).
void scatter_to_region_forward(const comm::Group& group, const float* x, int64_t rows, int64_t cols,
                               float* y);
// Backward: dy [rows, cols/p] -> dx [rows, cols] (all-gather along cols).
void scatter_to_region_backward(const comm::Group& group, const float* dy, int64_t rows,
                                int64_t cols, float* dx, float* scratch = nullptr);
int64_t scatter_to_region_backward_scratch(int64_t rows, int64_t cols, int parts);

// ---- gather_from_region: split along cols -> replicated ----
// Forward: x [rows, cols/p] -> y [rows, cols] (all-gather along cols).
void gather_from_region_forward(const comm::Group& group, const float* x, int64_t rows,
                                int64_t cols, float* y, float* scratch = nullptr);
int64_t gather_from_region_forward_scratch(int64_t rows, int64_t cols, int parts);
// Backward: dy [rows, cols] -> dx [rows, cols/p], this rank's columns (no communication).
void gather_from_region_backward(const comm::Group& group, const float* dy, int64_t rows,
                                 int64_t cols, float* dx);

// ---- sequence parallelism: rows (tokens) split over the group ----
// gather_from_sequence forward: x [rows/p, cols] (this rank's rows, shard_of(rows)) -> y [rows,
// cols] (all-gather along rows).
void gather_from_sequence_forward(const comm::Group& group, const float* x, int64_t rows,
                                  int64_t cols, float* y, float* scratch = nullptr);
// gather_from_sequence backward: dy [rows, cols] partial gradients -> dx [rows/p, cols], this
// rank's rows summed over the group (reduce-scatter along rows).
void gather_from_sequence_backward(const comm::Group& group, const float* dy, int64_t rows,
                                   int64_t cols, float* dx, float* scratch = nullptr);

// reduce_scatter_to_sequence forward: x [rows, cols] partial sums -> y [rows/p, cols], this
// rank's rows summed over the group (reduce-scatter along rows).
void reduce_scatter_to_sequence_forward(const comm::Group& group, const float* x, int64_t rows,
                                        int64_t cols, float* y, float* scratch = nullptr);
// reduce_scatter_to_sequence backward: dy [rows/p, cols] -> dx [rows, cols] (all-gather along
// rows).
void reduce_scatter_to_sequence_backward(const comm::Group& group, const float* dy, int64_t rows,
                                         int64_t cols, float* dx, float* scratch = nullptr);

// Scratch (floats) for any of the four sequence mappings: 0 when `parts` divides `rows`, else
// room for the padded blocks of every rank.
int64_t sequence_scratch(int64_t rows, int64_t cols, int parts);
// `buffer` resized to sequence_scratch(rows, cols, group.size()) floats: its data, or null when
// the split is even and no staging is needed (what the sequence mappings' `scratch` takes).
float* sequence_scratch(std::vector<float>& buffer, int64_t rows, int64_t cols,
                        const comm::Group& group);

// The gradient of a row-parallel output on all `rows` rows, as a layer's backward takes it from
// `dout`: under SP (`sp`), gathered from this rank's rows into `buf` (reduce_scatter_to_sequence
// backward, staging in `seq`); else `dout` itself, or a copy in `buf` when `keep` (a deferred
// weight pass reads it after `dout` is gone).
const float* output_grad_on_all_rows(const comm::Group& group, const float* dout, int64_t rows,
                                     int64_t cols, bool sp, bool keep, std::vector<float>& buf,
                                     float* seq);

}  // namespace parallm::parallel
