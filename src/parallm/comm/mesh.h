// The rank mesh: TP x PP x DP (x EP) over a world group, in Megatron's order. TP is fastest, then
// DP, then PP:  global = tp + dp * TP + pp * TP * DP, so a TP group is TP neighbouring ranks (one
// node, fastest links) and a PP group strides across the whole TP x DP block.
// EP is carved from DP as Megatron does: within one (pp, tp) the DP ranks are cut into DP / EP
// consecutive blocks of EP ranks; each block is an expert-parallel group, and ranks at the same
// position of different blocks form the expert-data-parallel group ("edp").
//
// Example, 16 ranks as TP2 x PP4 x DP2: tp groups {0,1} {2,3} ... {14,15}; dp groups {0,2} {1,3}
// {4,6} ...; pp groups {0,4,8,12} {1,5,9,13} {2,6,10,14} {3,7,11,15}.
#pragma once

#include <vector>

#include "parallm/comm/group.h"

namespace parallm::comm {

struct MeshShape {
  int tp = 1, pp = 1, dp = 1, ep = 1;  // dp <= 0: whatever the world size leaves (world / tp*pp)
};

// The rank lists of every group of a layout (pure arithmetic; what Mesh builds).
struct MeshLayout {
  MeshShape shape;  // with dp resolved
  std::vector<std::vector<int>> tp, pp, dp, ep, edp;
};
// Throws std::invalid_argument naming the degrees and the world size when they do not fit.
MeshLayout mesh_layout(int world_size, MeshShape shape);

class Mesh {
 public:
  // Collective over `world`: every rank constructs its Mesh with the same shape.
  Mesh(Group world, MeshShape shape);

  const MeshShape& shape() const { return shape_; }
  const Group& world() const { return world_; }
  const Group& tp() const { return tp_; }
  const Group& pp() const { return pp_; }
  const Group& dp() const { return dp_; }
  const Group& ep() const { return ep_; }
  const Group& edp() const { return edp_; }  // same expert shard, different EP blocks
  // This rank's TP x EP block (the TP groups of its EP group's ranks), in world order: the ranks
  // that hold the same tokens when EP ranks replicate attention (inference with --ep). The tp group
  // itself when EP is 1.
  const Group& tp_ep() const { return tp_ep_; }

  int tp_rank() const { return tp_.rank(); }
  int pp_rank() const { return pp_.rank(); }
  int dp_rank() const { return dp_.rank(); }
  int ep_rank() const { return ep_.rank(); }
  int tp_size() const { return shape_.tp; }
  int pp_size() const { return shape_.pp; }
  int dp_size() const { return shape_.dp; }
  int ep_size() const { return shape_.ep; }
  bool first_stage() const { return pp_rank() == 0; }
  bool last_stage() const { return pp_rank() == shape_.pp - 1; }
  // The world rank of (tp, dp, pp) coordinates.
  int global_rank(int tp, int dp, int pp) const {
    return tp + dp * shape_.tp + pp * shape_.tp * shape_.dp;
  }

 private:
  MeshShape shape_;
  Group world_, tp_, pp_, dp_, ep_, edp_, tp_ep_;
};

}  // namespace parallm::comm
