#include "parallm/comm/mesh.h"

#include "parallm/core/error.h"

namespace parallm::comm {

MeshLayout mesh_layout(int world_size, MeshShape s) {
  if (s.tp < 1 || s.pp < 1 || s.ep < 1)
    fail("mesh", "parallel degrees must be >= 1, got --tp ", s.tp, " --pp ", s.pp, " --ep ", s.ep);
  if (s.dp <= 0) {
    if (world_size % (s.tp * s.pp) != 0)
      fail("mesh", "world size ", world_size, " is not a multiple of tp ", s.tp, " x pp ", s.pp);
    s.dp = world_size / (s.tp * s.pp);
  }
  if (s.tp * s.pp * s.dp != world_size)
    fail("mesh", "tp ", s.tp, " x pp ", s.pp, " x dp ", s.dp, " = ", s.tp * s.pp * s.dp,
         " ranks, but the world has ", world_size);
  if (s.dp % s.ep != 0)
    fail("mesh", "ep ", s.ep, " must divide dp ", s.dp,
         " (expert-parallel groups are carved from the data-parallel ranks, as in Megatron)");
  const int T = s.tp, P = s.pp, D = s.dp, E = s.ep;
  auto g = [&](int t, int d, int p) { return t + d * T + p * T * D; };
  MeshLayout m;
  m.shape = s;
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < D; ++d) {
      std::vector<int> ranks;
      for (int t = 0; t < T; ++t) ranks.push_back(g(t, d, p));
      m.tp.push_back(ranks);
    }
  for (int p = 0; p < P; ++p)
    for (int t = 0; t < T; ++t) {
      std::vector<int> ranks;
      for (int d = 0; d < D; ++d) ranks.push_back(g(t, d, p));
      m.dp.push_back(ranks);
    }
  for (int d = 0; d < D; ++d)
    for (int t = 0; t < T; ++t) {
      std::vector<int> ranks;
      for (int p = 0; p < P; ++p) ranks.push_back(g(t, d, p));
      m.pp.push_back(ranks);
    }
  // Megatron's order: per pp stage, per block of E dp ranks, per tp rank.
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < D / E; ++b)
      for (int t = 0; t < T; ++t) {
        std::vector<int> ranks;
        for (int e = 0; e < E; ++e) ranks.push_back(g(t, b * E + e, p));
        m.ep.push_back(ranks);
      }
  for (int p = 0; p < P; ++p)
    for (int e = 0; e < E; ++e)
      for (int t = 0; t < T; ++t) {
        std::vector<int> ranks;
        for (int b = 0; b < D / E; ++b) ranks.push_back(g(t, b * E + e, p));
        m.edp.push_back(ranks);
      }
  return m;
}

Mesh::Mesh(Group world, MeshShape shape) : world_(std::move(world)) {
  shape_ = mesh_layout(world_.size(), shape).shape;
  const int T = shape_.tp, D = shape_.dp, E = shape_.ep;
  const int r = world_.rank();
  const int t = r % T, d = (r / T) % D, p = r / (T * D);
  // Colors number the groups; keys order the ranks inside them.
  tp_ = world_.split(p * D + d, t, "tp");
  dp_ = world_.split(p * T + t, d, "dp");
  pp_ = world_.split(d * T + t, p, "pp");
  ep_ = world_.split((p * (D / E) + d / E) * T + t, d % E, "ep");
  edp_ = world_.split((p * E + d % E) * T + t, d / E, "edp");
  tp_ep_ = E == 1 ? tp_ : world_.split(p * (D / E) + d / E, (d % E) * T + t, "tp_ep");
}

}  // namespace parallm::comm
