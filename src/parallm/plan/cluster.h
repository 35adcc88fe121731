// Builds the ClusterSpec the planner works on from what the user says: a device preset or JSON,
// node and device counts, link presets, an optional cluster JSON file and an optional
// `nvidia-smi topo -m` capture (which decides the NVLink islands).
#pragma once

#include <string>

#include "parallm/plan/hardware.h"

namespace parallm::plan {

// Bounds on device counts: far beyond any real cluster, small enough that the layout search over
// divisors and every product of degrees stay cheap and exact. A node's devices are bounded like a
// topology matrix's columns.
constexpr int kMaxDevices = 1 << 20;
constexpr int kMaxDevicesPerNode = 1024;

struct ClusterOptions {
  std::string gpu;            // device preset or JSON file; "" = from the hardware file or a100-80g
  std::string hardware_file;  // {"gpu", "nodes", "gpus_per_node", "intra_node", "inter_node"}
  int gpus = 0;               // devices in all (one node unless nodes says otherwise)
  int nodes = 0;
  int gpus_per_node = 0;
  std::string link;        // intra-node link preset ("nvlink" = the device's generation)
  std::string inter_node;  // between nodes
  std::string topology_file;
};

// Throws std::invalid_argument naming the flag or file field at fault.
ClusterSpec build_cluster(const ClusterOptions& o);

}  // namespace parallm::plan
