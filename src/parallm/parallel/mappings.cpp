#include "parallm/parallel/mappings.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/core/trace.h"

namespace parallm::parallel {
namespace {

void check_sizes(const char* what, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0)
    fail("parallel", what, ": rows ", rows, " and cols ", cols, " must be >= 0");
}

// Either the caller's scratch or a buffer owned here for the call.
class Staging {
 public:
  Staging(float* scratch, int64_t need) {
    if (scratch != nullptr || need == 0) {
      data_ = scratch;
    } else {
      own_.resize(static_cast<size_t>(need));
      data_ = own_.data();
    }
  }
  float* data() const { return data_; }

 private:
  std::vector<float> own_;
  float* data_ = nullptr;
};

void all_reduce(const comm::Group& group, float* x, int64_t n) {
  if (group.size() == 1 || n == 0) return;
  TraceSpan span("all_reduce", "comm");
  group.all_reduce(x, static_cast<size_t>(n));
}

// memcpy of n floats; n == 0 copies nothing (an empty shard's data may be null, which memcpy may
// not be given even for zero bytes).
void copy_floats(float* dst, const float* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

// One rank's mapping is the identity: y = x, in place when they are the same buffer.
void copy_unless_same(float* y, const float* x, int64_t n) {
  if (x != y && n > 0) std::memmove(y, x, static_cast<size_t>(n) * sizeof(float));
}

// Copies the columns [begin, begin + width) of src [rows, cols] into dst [rows, width].
void copy_cols(const float* src, int64_t rows, int64_t cols, int64_t begin, int64_t width,
               float* dst) {
  for (int64_t t = 0; t < rows; ++t)
    copy_floats(dst + t * width, src + t * cols + begin, width);
}

// Split along cols -> replicated: x [rows, shard] -> y [rows, cols]. Every rank's block goes out
// padded to the largest shard; the gathered blocks are [p][rows][width] and y wants
// [rows][cols], so they land in staging first, except for one row split evenly.
void all_gather_cols(const comm::Group& group, const float* x, int64_t rows, int64_t cols, float* y,
                     float* scratch) {
  const int p = group.size();
  const ShardSpec mine = shard_of(cols, group);
  if (p == 1) {
    copy_unless_same(y, x, rows * cols);
    return;
  }
  if (rows == 0 || cols == 0) return;
  const int64_t width = ShardSpec::max_size(cols, p);
  if (rows == 1 && cols % p == 0) {
    // One row split evenly: the gathered blocks are the row itself.
    TraceSpan span("all_gather", "comm");
    group.all_gather(x, y, static_cast<size_t>(width), DType::F32);
    return;
  }
  Staging staging(scratch, (p + 1) * rows * width);
  const float* send = x;                        // [rows, width]
  float* recv = staging.data() + rows * width;  // [p, rows, width]
  if (cols % p != 0) {
    float* padded = staging.data();
    for (int64_t t = 0; t < rows; ++t) {
      copy_floats(padded + t * width, x + t * mine.size(), mine.size());
      std::fill(padded + t * width + mine.size(), padded + (t + 1) * width, 0.0f);
    }
    send = padded;
  }
  {
    TraceSpan span("all_gather", "comm");
    group.all_gather(send, recv, static_cast<size_t>(rows * width), DType::F32);
  }
  for (int r = 0; r < p; ++r) {
    const ShardSpec s = ShardSpec::even(cols, p, r);
    const float* block = recv + r * rows * width;
    for (int64_t t = 0; t < rows; ++t)
      copy_floats(y + t * cols + s.begin, block + t * width, s.size());
  }
}

// Replicated -> split along cols: x [rows, cols] -> y [rows, shard] (no communication).
void split_cols(const comm::Group& group, const float* x, int64_t rows, int64_t cols, float* y) {
  const ShardSpec mine = shard_of(cols, group);
  if (group.size() == 1) {
    copy_unless_same(y, x, rows * cols);
    return;
  }
  copy_cols(x, rows, cols, mine.begin, mine.size(), y);
}

// Split along rows -> replicated: x [shard, cols] -> y [rows, cols].
void all_gather_rows(const comm::Group& group, const float* x, int64_t rows, int64_t cols, float* y,
                     float* scratch) {
  const int p = group.size();
  const ShardSpec mine = shard_of(rows, group);
  if (p == 1) {
    copy_unless_same(y, x, rows * cols);
    return;
  }
  if (rows == 0 || cols == 0) return;
  if (rows % p == 0) {
    // Rank r's rows land at r * rows/p: the gathered blocks are y itself.
    TraceSpan span("all_gather", "comm");
    group.all_gather(x, y, static_cast<size_t>(mine.size() * cols), DType::F32);
    return;
  }
  const int64_t block = ShardSpec::max_size(rows, p) * cols;
  Staging staging(scratch, (p + 1) * block);
  float* send = staging.data();  // [max_rows, cols]
  float* recv = send + block;    // [p, max_rows, cols]
  copy_floats(send, x, mine.size() * cols);
  std::fill(send + mine.size() * cols, send + block, 0.0f);
  {
    TraceSpan span("all_gather", "comm");
    group.all_gather(send, recv, static_cast<size_t>(block), DType::F32);
  }
  for (int r = 0; r < p; ++r) {
    const ShardSpec s = ShardSpec::even(rows, p, r);
    copy_floats(y + s.begin * cols, recv + r * block, s.size() * cols);
  }
}

// Partial sums, replicated shape -> this rank's rows of the sum: x [rows, cols] -> y [shard, cols].
void reduce_scatter_rows(const comm::Group& group, const float* x, int64_t rows, int64_t cols,
                         float* y, float* scratch) {
  const int p = group.size();
  const ShardSpec mine = shard_of(rows, group);
  if (p == 1) {
    copy_unless_same(y, x, rows * cols);
    return;
  }
  if (rows == 0 || cols == 0) return;
  if (rows % p == 0) {
    TraceSpan span("reduce_scatter", "comm");
    group.reduce_scatter(x, y, static_cast<size_t>(mine.size() * cols), DType::F32);
    return;
  }
  // Rank r's rows go out in block r, padded with zero rows (which sum to zero rows).
  const int64_t block = ShardSpec::max_size(rows, p) * cols;
  Staging staging(scratch, (p + 1) * block);
  float* send = staging.data();    // [p, max_rows, cols]
  float* recv = send + p * block;  // [max_rows, cols]
  for (int r = 0; r < p; ++r) {
    const ShardSpec s = ShardSpec::even(rows, p, r);
    float* dst = send + r * block;
    copy_floats(dst, x + s.begin * cols, s.size() * cols);
    std::fill(dst + s.size() * cols, dst + block, 0.0f);
  }
  {
    TraceSpan span("reduce_scatter", "comm");
    group.reduce_scatter(send, recv, static_cast<size_t>(block), DType::F32);
  }
  copy_floats(y, recv, mine.size() * cols);
}

}  // namespace

ShardSpec shard_of(int64_t full, const comm::Group& group) {
  return ShardSpec::even(full, group.size(), group.rank());
}

void copy_to_region_forward(const comm::Group&, float*, int64_t rows, int64_t cols) {
  check_sizes("copy_to_region_forward", rows, cols);
}

void copy_to_region_backward(const comm::Group& group, float* dx, int64_t rows, int64_t cols) {
  check_sizes("copy_to_region_backward", rows, cols);
  all_reduce(group, dx, rows * cols);
}

void reduce_from_region_forward(const comm::Group& group, float* x, int64_t rows, int64_t cols) {
  check_sizes("reduce_from_region_forward", rows, cols);
  all_reduce(group, x, rows * cols);
}

void reduce_from_region_backward(const comm::Group&, float*, int64_t rows, int64_t cols) {
  check_sizes("reduce_from_region_backward", rows, cols);
}

void scatter_to_region_forward(const comm::Group& group, const float* x, int64_t rows, int64_t cols,
                               float* y) {
  check_sizes("scatter_to_region_forward", rows, cols);
  split_cols(group, x, rows, cols, y);
}

void scatter_to_region_backward(const comm::Group& group, const float* dy, int64_t rows,
                                int64_t cols, float* dx, float* scratch) {
  check_sizes("scatter_to_region_backward", rows, cols);
  all_gather_cols(group, dy, rows, cols, dx, scratch);
}

int64_t scatter_to_region_backward_scratch(int64_t rows, int64_t cols, int parts) {
  return gather_from_region_forward_scratch(rows, cols, parts);
}

void gather_from_region_forward(const comm::Group& group, const float* x, int64_t rows,
                                int64_t cols, float* y, float* scratch) {
  check_sizes("gather_from_region_forward", rows, cols);
  all_gather_cols(group, x, rows, cols, y, scratch);
}

int64_t gather_from_region_forward_scratch(int64_t rows, int64_t cols, int parts) {
  if (parts <= 1) return 0;
  return (parts + 1) * rows * ShardSpec::max_size(cols, parts);
}

void gather_from_region_backward(const comm::Group& group, const float* dy, int64_t rows,
                                 int64_t cols, float* dx) {
  check_sizes("gather_from_region_backward", rows, cols);
  split_cols(group, dy, rows, cols, dx);
}

void gather_from_sequence_forward(const comm::Group& group, const float* x, int64_t rows,
                                  int64_t cols, float* y, float* scratch) {
  check_sizes("gather_from_sequence_forward", rows, cols);
  all_gather_rows(group, x, rows, cols, y, scratch);
}

void gather_from_sequence_backward(const comm::Group& group, const float* dy, int64_t rows,
                                   int64_t cols, float* dx, float* scratch) {
  check_sizes("gather_from_sequence_backward", rows, cols);
  reduce_scatter_rows(group, dy, rows, cols, dx, scratch);
}

void reduce_scatter_to_sequence_forward(const comm::Group& group, const float* x, int64_t rows,
                                        int64_t cols, float* y, float* scratch) {
  check_sizes("reduce_scatter_to_sequence_forward", rows, cols);
  reduce_scatter_rows(group, x, rows, cols, y, scratch);
}

void reduce_scatter_to_sequence_backward(const comm::Group& group, const float* dy, int64_t rows,
                                         int64_t cols, float* dx, float* scratch) {
  check_sizes("reduce_scatter_to_sequence_backward", rows, cols);
  all_gather_rows(group, dy, rows, cols, dx, scratch);
}

int64_t sequence_scratch(int64_t rows, int64_t cols, int parts) {
  if (parts <= 1 || rows % parts == 0) return 0;
  return (parts + 1) * ShardSpec::max_size(rows, parts) * cols;
}

float* sequence_scratch(std::vector<float>& buffer, int64_t rows, int64_t cols,
                        const comm::Group& group) {
  buffer.resize(static_cast<size_t>(sequence_scratch(rows, cols, group.size())));
  return buffer.empty() ? nullptr : buffer.data();
}

const float* output_grad_on_all_rows(const comm::Group& group, const float* dout, int64_t rows,
                                     int64_t cols, bool sp, bool keep, std::vector<float>& buf,
                                     float* seq) {
  if (!sp && !keep) return dout;
  buf.resize(static_cast<size_t>(rows * cols));
  if (sp) {
    reduce_scatter_to_sequence_backward(group, dout, rows, cols, buf.data(), seq);
  } else {
    copy_floats(buf.data(), dout, rows * cols);
  }
  return buf.data();
}

}  // namespace parallm::parallel
