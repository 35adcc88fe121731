// The mappings at TP 1..4 (ranks as threads), each forward and each backward against the plain
// single-rank result, bitwise: every tensor holds small integers, so sums are exact in any order.
// Sizes include splits that the group does not divide (rows 7 at TP 2..4, cols 13) and empty ones.
#include "parallm/parallel/mappings.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "parallm/comm/launch.h"

namespace parallm::parallel {
namespace {

using Mat = std::vector<float>;

// A [rows, cols] matrix of integers that depend on a seed (the rank, for per-rank tensors).
Mat ints(int64_t rows, int64_t cols, int seed) {
  Mat m(static_cast<size_t>(rows * cols));
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = 0; c < cols; ++c)
      m[t * cols + c] = static_cast<float>((seed * 37 + t * 11 + c * 5) % 23 - 11);
  return m;
}

Mat cols_of(const Mat& m, int64_t rows, int64_t cols, const ShardSpec& s) {
  Mat out;
  for (int64_t t = 0; t < rows; ++t)
    out.insert(out.end(), m.begin() + t * cols + s.begin, m.begin() + t * cols + s.end);
  return out;
}

Mat rows_of(const Mat& m, int64_t cols, const ShardSpec& s) {
  return Mat(m.begin() + s.begin * cols, m.begin() + s.end * cols);
}

// The single-rank sum of every rank's tensor.
Mat sum_over_ranks(int64_t rows, int64_t cols, int p) {
  Mat s(static_cast<size_t>(rows * cols), 0.0f);
  for (int r = 0; r < p; ++r) {
    const Mat m = ints(rows, cols, r);
    for (size_t i = 0; i < s.size(); ++i) s[i] += m[i];
  }
  return s;
}

bool same_bits(const Mat& a, const Mat& b) {
  // (memcmp may not be given the null data() of an empty vector, even for 0 bytes.)
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// Runs fn on every rank of a local TP group of size p; failures inside ranks are collected.
void on_ranks(int p, comm::Algorithm algo,
              const std::function<void(const comm::Group&, std::vector<std::string>&)>& fn) {
  std::mutex mu;
  std::vector<std::string> errors;
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 60;
  lo.algorithm = algo;
  comm::launch(p, lo, [&](comm::Group world) {
    std::vector<std::string> mine;
    fn(world, mine);
    std::lock_guard<std::mutex> lock(mu);
    for (auto& e : mine) errors.push_back("rank " + std::to_string(world.rank()) + ": " + e);
  });
  for (const auto& e : errors)
    ADD_FAILURE() << "tp " << p << " " << comm::algorithm_name(algo) << ": " << e;
}

struct Case {
  int64_t rows, cols;
};
const Case kCases[] = {{1, 1},  {1, 13}, {1, 12}, {5, 6}, {7, 13},
                       {8, 12}, {12, 7}, {0, 4},  {3, 0}, {2, 3}};

class Mappings : public ::testing::TestWithParam<std::tuple<int, comm::Algorithm>> {};

TEST_P(Mappings, EachForwardAndBackwardEqualsTheSingleRankResult) {
  // Plain names, not a structured binding: clang 14 cannot capture those in a lambda.
  const auto param = GetParam();
  const auto p = std::get<0>(param);
  const auto algo = std::get<1>(param);
  on_ranks(p, algo, [&](const comm::Group& g, std::vector<std::string>& errors) {
    const int r = g.rank();
    auto check = [&](bool ok, const std::string& what, const Case& c) {
      if (!ok)
        errors.push_back(what + " at rows " + std::to_string(c.rows) + " cols " +
                         std::to_string(c.cols));
    };
    for (const Case& c : kCases) {
      const int64_t R = c.rows, C = c.cols;
      const ShardSpec cs = ShardSpec::even(C, p, r), rs = ShardSpec::even(R, p, r);
      const Mat full = ints(R, C, 100);   // the same on every rank
      const Mat partial = ints(R, C, r);  // differs per rank
      const Mat total = sum_over_ranks(R, C, p);
      // Scratch from the *_scratch functions on every other case, null (allocating) otherwise.
      const bool give_scratch = (R + C) % 2 == 0;
      Mat scratch(static_cast<size_t>(std::max<int64_t>(
          {gather_from_region_forward_scratch(R, C, p), scatter_to_region_backward_scratch(R, C, p),
           sequence_scratch(R, C, p), 1})));
      float* sp = give_scratch ? scratch.data() : nullptr;

      // copy: identity / all-reduce.
      Mat x = full;
      copy_to_region_forward(g, x.data(), R, C);
      check(same_bits(x, full), "copy forward", c);
      x = partial;
      copy_to_region_backward(g, x.data(), R, C);
      check(same_bits(x, total), "copy backward", c);
      // reduce: all-reduce / identity; conjugate: forward(reduce) == backward(copy).
      Mat y = partial;
      reduce_from_region_forward(g, y.data(), R, C);
      check(same_bits(y, total), "reduce forward", c);
      check(same_bits(y, x), "reduce forward == copy backward", c);
      y = full;
      reduce_from_region_backward(g, y.data(), R, C);
      check(same_bits(y, full), "reduce backward", c);

      // scatter: split cols / all-gather cols.
      Mat local(static_cast<size_t>(R * cs.size()), -99.0f);
      scatter_to_region_forward(g, full.data(), R, C, local.data());
      check(same_bits(local, cols_of(full, R, C, cs)), "scatter forward", c);
      Mat gathered(static_cast<size_t>(R * C), -99.0f);
      scatter_to_region_backward(g, cols_of(full, R, C, cs).data(), R, C, gathered.data(), sp);
      check(same_bits(gathered, full), "scatter backward", c);
      // gather: all-gather cols / split cols; conjugates of scatter's.
      Mat g_fwd(static_cast<size_t>(R * C), -99.0f);
      gather_from_region_forward(g, cols_of(full, R, C, cs).data(), R, C, g_fwd.data(), sp);
      check(same_bits(g_fwd, full), "gather forward", c);
      check(same_bits(g_fwd, gathered), "gather forward == scatter backward", c);
      Mat g_bwd(static_cast<size_t>(R * cs.size()), -99.0f);
      gather_from_region_backward(g, full.data(), R, C, g_bwd.data());
      check(same_bits(g_bwd, cols_of(full, R, C, cs)), "gather backward", c);
      check(same_bits(g_bwd, local), "gather backward == scatter forward", c);

      // Sequence parallel: rows split.
      Mat seq_full(static_cast<size_t>(R * C), -99.0f);
      gather_from_sequence_forward(g, rows_of(full, C, rs).data(), R, C, seq_full.data(), sp);
      check(same_bits(seq_full, full), "gather_from_sequence forward", c);
      Mat seq_rs(static_cast<size_t>(rs.size() * C), -99.0f);
      gather_from_sequence_backward(g, partial.data(), R, C, seq_rs.data(), sp);
      check(same_bits(seq_rs, rows_of(total, C, rs)), "gather_from_sequence backward", c);
      Mat rs_fwd(static_cast<size_t>(rs.size() * C), -99.0f);
      reduce_scatter_to_sequence_forward(g, partial.data(), R, C, rs_fwd.data(), sp);
      check(same_bits(rs_fwd, rows_of(total, C, rs)), "reduce_scatter_to_sequence forward", c);
      check(same_bits(rs_fwd, seq_rs),
            "reduce_scatter_to_sequence forward == gather_from_sequence backward", c);
      Mat rs_bwd(static_cast<size_t>(R * C), -99.0f);
      reduce_scatter_to_sequence_backward(g, rows_of(full, C, rs).data(), R, C, rs_bwd.data(), sp);
      check(same_bits(rs_bwd, full), "reduce_scatter_to_sequence backward", c);
      check(same_bits(rs_bwd, seq_full),
            "reduce_scatter_to_sequence backward == gather_from_sequence forward", c);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(TpSizes, Mappings,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(comm::Algorithm::Auto,
                                                              comm::Algorithm::Ring,
                                                              comm::Algorithm::RecursiveDoubling)),
                         [](const auto& info) {
                           return "tp" + std::to_string(std::get<0>(info.param)) + "_" +
                                  std::string(comm::algorithm_name(std::get<1>(info.param)));
                         });

TEST(Mappings, ShardOfIsTheNearEvenSplit) {
  on_ranks(3, comm::Algorithm::Auto, [](const comm::Group& g, std::vector<std::string>& errors) {
    const ShardSpec s = shard_of(7, g);
    const ShardSpec e = ShardSpec::even(7, 3, g.rank());
    if (s.begin != e.begin || s.end != e.end || s.full != 7) errors.push_back("shard_of(7)");
  });
}

TEST(Mappings, NegativeSizesAreRefused) {
  comm::Group self;
  Mat x(4);
  EXPECT_THROW(reduce_from_region_forward(self, x.data(), -1, 4), std::invalid_argument);
  EXPECT_THROW(gather_from_region_forward(self, x.data(), 1, -4, x.data()), std::invalid_argument);
}

}  // namespace
}  // namespace parallm::parallel
