// `nvidia-smi topo -m` parsing: the link class between every pair of GPUs (and NICs) of one node,
// and the NVLink islands that bound tensor parallelism.
//
// The parser keys on the matrix only: a header line of device names (GPU0.., NIC0.., mlx5_0..)
// followed by other column titles ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID"), then one row
// per device whose first cells are the link classes. Cells are separated by spaces or tabs; the
// legend below the matrix is ignored (its wording differs between driver versions).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace parallm::plan {

// Bounds of a capture: a node with 1024 devices (GPUs and NICs) would print a 1024 x 1024 matrix
// of about 6 MB; beyond that the input is not `nvidia-smi topo -m` and is refused before the
// matrix is allocated.
constexpr size_t kMaxTopologyDevices = 1024;
constexpr size_t kMaxTopologyFileBytes = size_t(16) << 20;

// Fastest first. NVLink carries the number of links in `nvlinks`.
enum class TopoLink { Self, NVLink, PIX, PXB, PHB, Node, Sys };

std::string topo_link_name(TopoLink l, int nvlinks = 0);  // "X", "NV12", "PIX", ...

struct Topology {
  std::string source;
  std::vector<std::string> devices;         // matrix columns in order: "GPU0", ..., "NIC0", ...
  std::vector<int> gpu_columns;             // indices into `devices` of the GPUs, GPU0 first
  std::vector<std::vector<TopoLink>> link;  // [device][device]
  std::vector<std::vector<int>> nvlinks;    // [device][device] NVLink count, 0 if none

  int num_gpus() const { return int(gpu_columns.size()); }
  // Link between GPU i and GPU j (GPU ordinals, not columns).
  TopoLink gpu_link(int i, int j) const;
  int gpu_nvlinks(int i, int j) const;
  // Groups of GPU ordinals joined by NVLink (connected components of the NV# graph), singletons
  // included, ordered by their smallest member.
  std::vector<std::vector<int>> nvlink_islands() const;
  // True when every pair inside the island has a direct NVLink (an NVSwitch or full mesh).
  bool fully_connected(const std::vector<int>& island) const;
  // Fewest NVLinks between two members of an island (what bounds a ring over it).
  int min_nvlinks(const std::vector<int>& island) const;

  // Throws std::invalid_argument naming `source`, the row and the cell at fault.
  static Topology parse(const std::string& text, const std::string& source);
  static Topology from_file(const std::string& path);
};

}  // namespace parallm::plan
