// The rank mesh: rank lists against hand-written layouts, errors, and the groups Mesh builds.
#include "parallm/comm/mesh.h"

#include <gtest/gtest.h>

#include <mutex>

#include "parallm/comm/launch.h"

namespace parallm::comm {
namespace {

using Lists = std::vector<std::vector<int>>;

TEST(MeshLayout, Tp2Pp4Dp2On16Ranks) {
  MeshLayout m = mesh_layout(16, {.tp = 2, .pp = 4, .dp = 2});
  EXPECT_EQ(m.tp, (Lists{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(m.dp, (Lists{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(m.pp, (Lists{{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}}));
  EXPECT_EQ(
      m.ep,
      (Lists{
          {0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, {12}, {13}, {14}, {15}}));
}

TEST(MeshLayout, Tp2Dp4Ep2On8Ranks) {
  // Megatron: EP groups are consecutive DP ranks of the same TP rank; EDP strides across blocks.
  MeshLayout m = mesh_layout(8, {.tp = 2, .pp = 1, .dp = 4, .ep = 2});
  EXPECT_EQ(m.tp, (Lists{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  EXPECT_EQ(m.dp, (Lists{{0, 2, 4, 6}, {1, 3, 5, 7}}));
  EXPECT_EQ(m.pp, (Lists{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}}));
  EXPECT_EQ(m.ep, (Lists{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(m.edp, (Lists{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
}

TEST(MeshLayout, Tp3Pp2Dp2On12RanksAndInferredDp) {
  MeshLayout m = mesh_layout(12, {.tp = 3, .pp = 2, .dp = 0});
  EXPECT_EQ(m.shape.dp, 2);
  EXPECT_EQ(m.tp, (Lists{{0, 1, 2}, {3, 4, 5}, {6, 7, 8}, {9, 10, 11}}));
  EXPECT_EQ(m.dp, (Lists{{0, 3}, {1, 4}, {2, 5}, {6, 9}, {7, 10}, {8, 11}}));
  EXPECT_EQ(m.pp, (Lists{{0, 6}, {1, 7}, {2, 8}, {3, 9}, {4, 10}, {5, 11}}));
}

TEST(MeshLayout, Pp7On7Ranks) {
  MeshLayout m = mesh_layout(7, {.pp = 7});
  EXPECT_EQ(m.pp, (Lists{{0, 1, 2, 3, 4, 5, 6}}));
  EXPECT_EQ(m.tp.size(), 7u);
}

TEST(MeshLayout, ErrorsNameTheDegrees) {
  auto msg = [](int world, MeshShape s) -> std::string {
    try {
      mesh_layout(world, s);
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_EQ(msg(8, {.tp = 2, .pp = 2, .dp = 3}),
            "[mesh] tp 2 x pp 2 x dp 3 = 12 ranks, but the world has 8");
  EXPECT_NE(msg(8, {.tp = 2, .pp = 1, .dp = 4, .ep = 3}).find("ep 3 must divide dp 4"),
            std::string::npos);
  EXPECT_NE(msg(7, {.tp = 2, .dp = 0}).find("world size 7 is not a multiple of tp 2 x pp 1"),
            std::string::npos);
  EXPECT_NE(msg(4, {.tp = 0}).find("--tp 0"), std::string::npos);
}

// Builds the mesh over 16 local ranks and checks each group's members (gathered world ranks)
// against mesh_layout's lists, and the names.
TEST(Mesh, GroupsMatchLayoutOnLocalRanks) {
  const MeshShape shape{.tp = 2, .pp = 4, .dp = 2};
  const MeshLayout want = mesh_layout(16, shape);
  auto find = [](const Lists& lists, int r) {
    for (const auto& l : lists)
      for (int x : l)
        if (x == r) return l;
    return std::vector<int>{};
  };
  std::mutex mu;
  std::vector<std::string> errors;
  LaunchOptions o;
  o.backend = "local";
  launch(16, o, [&](Group world) {
    Mesh mesh(world, shape);
    const int r = world.rank();
    auto members = [&](const Group& g) {
      std::vector<float> got(g.size());
      const float mine = float(r);
      g.all_gather(&mine, got.data(), 1, DType::F32);
      return std::vector<int>(got.begin(), got.end());
    };
    auto check = [&](const Group& g, const Lists& lists, const char* name) {
      std::vector<int> got = members(g), expect = find(lists, r);
      if (got != expect || g.name() != name) {
        std::lock_guard<std::mutex> lock(mu);
        errors.push_back(std::string(name) + " group of rank " + std::to_string(r));
      }
    };
    check(mesh.tp(), want.tp, "tp");
    check(mesh.dp(), want.dp, "dp");
    check(mesh.pp(), want.pp, "pp");
    check(mesh.ep(), want.ep, "ep");
    EXPECT_EQ(mesh.tp_rank(), r % 2);
    EXPECT_EQ(mesh.dp_rank(), (r / 2) % 2);
    EXPECT_EQ(mesh.pp_rank(), r / 4);
    EXPECT_EQ(mesh.global_rank(mesh.tp_rank(), mesh.dp_rank(), mesh.pp_rank()), r);
  });
  EXPECT_TRUE(errors.empty()) << errors.size() << " wrong groups, first: " << errors[0];
}

// The TP x EP block (inference with --ep: the ranks holding the same tokens): TP 2 x PP 2 x DP 4
// with EP 2 on 16 ranks; global = tp + dp*2 + pp*8, EP blocks are dp {0,1} and {2,3}.
TEST(Mesh, TpEpBlockIsTheTpGroupsOfOneEpGroup) {
  LaunchOptions o;
  o.backend = "local";
  std::mutex mu;
  std::vector<std::vector<int>> blocks(16);
  launch(16, o, [&](Group world) {
    Mesh mesh(world, {.tp = 2, .pp = 2, .dp = 4, .ep = 2});
    const Group& g = mesh.tp_ep();
    std::vector<float> got(g.size());
    const float mine = float(world.rank());
    g.all_gather(&mine, got.data(), 1, DType::F32);
    std::lock_guard<std::mutex> lock(mu);
    blocks[world.rank()].assign(got.begin(), got.end());
    EXPECT_EQ(g.name(), "tp_ep");
  });
  EXPECT_EQ(blocks[0], (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(blocks[5], (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(blocks[9], (std::vector<int>{8, 9, 10, 11}));
  EXPECT_EQ(blocks[15], (std::vector<int>{12, 13, 14, 15}));
  // Without EP it is the TP group itself.
  launch(4, o, [&](Group world) {
    Mesh mesh(world, {.tp = 2, .pp = 1, .dp = 2});
    EXPECT_EQ(mesh.tp_ep().impl(), mesh.tp().impl());
  });
}

}  // namespace
}  // namespace parallm::comm
