// The stage link: messages are keyed by (micro-batch, chunk), so a receiver gets each key's own
// message whatever order the sender used, each key keeps its own buffer, and results travel back.
#include "parallm/pipeline/p2p.h"

#include <gtest/gtest.h>

#include <numeric>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/comm/stats.h"

namespace parallm::pipeline {
namespace {

comm::LaunchOptions local() {
  comm::LaunchOptions lo;
  lo.backend = "local";
  lo.timeout_s = 30;
  return lo;
}

// Micro-batch j, chunk c carries header {j, c} and j * 10 + c + 1 rows of value 100 j + c.
std::vector<float> rows(int j, int c) {
  return std::vector<float>(j * 10 + c + 1, 100.0f * j + c);
}

TEST(StageLink, EachKeyGetsItsOwnMessageAndBuffer) {
  for (int stages : {2, 3}) {
    comm::launch(stages, local(), [&](comm::Group pp) {
      StageLink link(pp, /*max_header=*/4, /*chunks=*/2);
      const int s = pp.rank();
      if (s == 0) {
        // Sent in reverse order of keys: the receiver asks in order.
        for (int j = 3; j >= 0; --j)
          for (int c = 1; c >= 0; --c) {
            const int64_t header[2] = {j, c};
            const std::vector<float> x = rows(j, c);
            link.send_activation(1, j, c, header, 2, x.data(), x.size());
          }
      } else if (s == 1) {
        std::vector<Activation*> held;
        for (int j = 0; j < 4; ++j)
          for (int c = 0; c < 2; ++c) {
            Activation& a = link.recv_activation(0, j, c);
            EXPECT_EQ(a.header, (std::vector<int64_t>{j, c}));
            EXPECT_EQ(a.data, rows(j, c));
            held.push_back(&a);
          }
        // Every key still holds its own rows: nothing shared a buffer.
        for (int j = 0; j < 4; ++j)
          for (int c = 0; c < 2; ++c) EXPECT_EQ(held[j * 2 + c]->data, rows(j, c)) << j << c;
        // Results back to stage 0, micro-batch 2 before 1: still matched by key.
        const int32_t two[3] = {7, 8, 9}, one[1] = {5};
        link.send_result(0, 2, two, 3);
        link.send_result(0, 1, one, 1);
      }
      if (s == 0) {
        int32_t got1[1] = {0}, got2[3] = {0, 0, 0};
        link.recv_result(1, 1, got1, 1);
        link.recv_result(1, 2, got2, 3);
        EXPECT_EQ(got1[0], 5);
        EXPECT_EQ(std::vector<int32_t>(got2, got2 + 3), (std::vector<int32_t>{7, 8, 9}));
      }
    });
  }
}

TEST(StageLink, EmptyActivationAndBadKeys) {
  comm::launch(2, local(), [&](comm::Group pp) {
    StageLink link(pp, 3);
    if (pp.rank() == 0) {
      const int64_t header[1] = {42};
      link.send_activation(1, 0, 0, header, 1, nullptr, 0);  // a header alone (an empty step)
      EXPECT_THROW(link.send_activation(1, 0, 0, header, 4, nullptr, 0), std::invalid_argument);
      EXPECT_THROW(link.tag(0, 1, 0), std::invalid_argument);  // one chunk only
      EXPECT_THROW(link.tag(100000, 0, 0), std::invalid_argument);
    } else {
      Activation& a = link.recv_activation(0, 0, 0);
      EXPECT_EQ(a.header, (std::vector<int64_t>{42}));
      EXPECT_TRUE(a.data.empty());
    }
  });
}

// Training sends activations forward and their gradients backward under the same keys, both ways
// between two stages: a gradient never matches an activation (its own tag kind), sent in any order.
TEST(StageLink, GradientsNeverMatchActivations) {
  comm::launch(2, local(), [&](comm::Group pp) {
    StageLink link(pp, 0, 2);
    const int other = 1 - pp.rank();
    const std::vector<float> act(5, 1.0f + pp.rank()), grad(5, -1.0f - pp.rank());
    // Each stage sends the gradient first, then the activation, for every key.
    for (int j = 0; j < 3; ++j)
      for (int c = 0; c < 2; ++c) {
        link.send_grad(other, j, c, grad.data(), grad.size());
        link.send_activation(other, j, c, nullptr, 0, act.data(), act.size());
      }
    for (int j = 0; j < 3; ++j)
      for (int c = 0; c < 2; ++c) {
        EXPECT_EQ(link.recv_activation(other, j, c).data, std::vector<float>(5, 1.0f + other));
        std::vector<float> g(5);
        link.recv_grad(other, j, c, g.data(), g.size());
        EXPECT_EQ(g, std::vector<float>(5, -1.0f - other));
      }
    EXPECT_NE(link.tag(0, 0, 3), link.tag(0, 0, 1));
    EXPECT_NE(link.tag(0, 0, 3), link.tag(0, 1, 0));
  });
}

// split_over: activations replicated over a TP group of 3 cross in thirds and arrive whole (the
// next stage's group all-gathers them), the link carrying each row once; rows a third does not
// divide cross whole; a header alone still crosses.
TEST(StageLink, SplitOverTheTpGroupCarriesEachRowOnce) {
  comm::launch(6, local(), [&](comm::Group world) {
    comm::Mesh mesh(world, comm::MeshShape{3, 2, 1, 1});
    StageLink link(mesh.pp(), 1);
    link.split_over(mesh.tp());
    EXPECT_TRUE(link.split());
    std::vector<float> even(12), odd(7);
    std::iota(even.begin(), even.end(), 1.0f);
    std::iota(odd.begin(), odd.end(), 50.0f);
    const int64_t header[1] = {9};
    if (mesh.pp_rank() == 0) {
      mesh.pp().stats().reset();
      link.send_activation(1, 0, 0, header, 1, even.data(), even.size());
      link.send_activation(1, 1, 0, header, 1, odd.data(), odd.size());
      link.send_activation(1, 2, 0, header, 1, nullptr, 0);
      // Each TP rank sent 4 of the 12 rows and all 7 of the others (plus three headers).
      const comm::KindStats sent = mesh.pp().stats().get(comm::Kind::Send);
      EXPECT_EQ(sent.bytes_sent, (4 + 7) * sizeof(float) + 3 * 3 * sizeof(int64_t));
    } else {
      Activation& a = link.recv_activation(0, 0, 0);
      EXPECT_EQ(a.header, (std::vector<int64_t>{9}));
      EXPECT_EQ(a.data, even);
      EXPECT_EQ(link.recv_activation(0, 1, 0).data, odd);
      EXPECT_TRUE(link.recv_activation(0, 2, 0).data.empty());
    }
  });
}

}  // namespace
}  // namespace parallm::pipeline
