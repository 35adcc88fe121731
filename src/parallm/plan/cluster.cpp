#include "parallm/plan/cluster.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "parallm/core/checked.h"
#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/plan/topology.h"

namespace parallm::plan {
namespace {

using nlohmann::json;

json read_json(const std::string& path, const char* component) {
  return read_json_file(path, component);
}

bool looks_like_file(const std::string& s) {
  std::error_code ec;
  return s.find('/') != std::string::npos || s.ends_with(".json") || std::filesystem::exists(s, ec);
}

// "nvlink" means the device's own generation.
LinkSpec resolve_link(const std::string& name, const DeviceSpec& d, const char* flag) {
  if (name == "nvlink") {
    const LinkSpec native = link_preset(d.native_link.empty() ? "pcie4" : d.native_link);
    return native.kind == LinkKind::NVLink ? native : link_preset("nvlink4");
  }
  // Asked first, so that only an unknown name is reported against the flag ("pcie" is
  // link_preset's alias of pcie4).
  const std::vector<std::string> names = link_preset_names();
  if (name != "pcie" && std::find(names.begin(), names.end(), name) == names.end()) {
    fail("hardware", flag, ": unknown link \"",
         name.size() <= 64 ? name : name.substr(0, 64) + "...", "\" (presets: nvlink, pcie, ",
         join(names, ", "), ")");
  }
  return link_preset(name);
}

}  // namespace

ClusterSpec build_cluster(const ClusterOptions& o) {
  json file = json::object();
  if (!o.hardware_file.empty()) {
    file = read_json(o.hardware_file, "hardware");
    if (!file.is_object()) fail("hardware", o.hardware_file, ": expected a JSON object");
  }
  const std::string src = o.hardware_file.empty() ? "--hardware" : o.hardware_file;
  ClusterSpec cl;
  // Device.
  if (!o.gpu.empty()) {
    cl.device = looks_like_file(o.gpu) ? device_from_json(read_json(o.gpu, "hardware"), o.gpu)
                                       : device_preset(o.gpu);
  } else if (file.contains("gpu")) {
    cl.device = device_from_json(file["gpu"], src + ": gpu");
  } else {
    cl.device = device_preset("a100-80g");
  }
  auto file_int = [&](const char* field, int max) {
    if (!file.contains(field)) return 0;
    const json& v = file[field];
    if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > max)
      fail("hardware", src, ": ", field, " must be an integer in 1..", max, ", got ",
           json_preview(v));
    return int(v.get<int64_t>());
  };
  // Counts (0: not given).
  if (o.gpus < 0 || o.nodes < 0 || o.gpus_per_node < 0 || o.gpus > kMaxDevices ||
      o.nodes > kMaxDevices || o.gpus_per_node > kMaxDevicesPerNode)
    fail("hardware", "--gpus ", o.gpus, ", --nodes ", o.nodes, ", --gpus-per-node ",
         o.gpus_per_node, ": counts must be in 1..", kMaxDevices, " (1..", kMaxDevicesPerNode,
         " per node)");
  std::optional<Topology> topo;
  if (!o.topology_file.empty()) topo = Topology::from_file(o.topology_file);
  int nodes = o.nodes ? o.nodes : file_int("nodes", kMaxDevices);
  int gpn = o.gpus_per_node ? o.gpus_per_node : file_int("gpus_per_node", kMaxDevicesPerNode);
  if (nodes == 0) nodes = (o.gpus && gpn) ? o.gpus / gpn : 1;
  if (gpn == 0) {
    if (o.gpus)
      gpn = o.gpus / nodes;
    else if (topo)
      gpn = topo->num_gpus();
    else
      gpn = 1;
  }
  if (gpn > kMaxDevicesPerNode)
    fail("hardware", "--gpus ", o.gpus, " over ", nodes, nodes == 1 ? " node" : " nodes", " is ",
         gpn, " devices per node, more than ", kMaxDevicesPerNode, " (give --nodes)");
  if (int64_t(nodes) * gpn > kMaxDevices)
    fail("hardware", nodes, " nodes x ", gpn, " devices is more than ", kMaxDevices, " devices");
  if (o.gpus && o.gpus != nodes * gpn)
    fail("hardware", "--gpus ", o.gpus, " is not --nodes ", nodes, " x --gpus-per-node ", gpn);
  if (topo && gpn > topo->num_gpus())
    fail("hardware", "--gpus-per-node ", gpn, " exceeds the ", topo->num_gpus(), " GPUs of ",
         o.topology_file);
  cl.nodes = nodes;
  cl.gpus_per_node = gpn;

  // Links.
  std::string intra = o.link;
  if (intra.empty() && file.contains("intra_node")) {
    cl.pcie = link_from_json(file["intra_node"], src + ": intra_node");
  } else {
    if (intra.empty()) intra = cl.device.native_link.empty() ? "pcie4" : cl.device.native_link;
    cl.pcie = resolve_link(intra, cl.device, "--link");
  }
  if (cl.pcie.kind == LinkKind::NVLink) {
    cl.has_nvlink = true;
    cl.nvlink = cl.pcie;
    cl.pcie = link_preset(cl.device.native_link == "pcie5" ? "pcie5" : "pcie4");
  }
  if (!o.inter_node.empty())
    cl.inter = resolve_link(o.inter_node, cl.device, "--inter-node");
  else if (file.contains("inter_node"))
    cl.inter = link_from_json(file["inter_node"], src + ": inter_node");
  else
    cl.inter = link_preset(cl.device.is_cpu ? "eth-10g" : "ib-hdr");

  // Topology: NVLink islands as nvidia-smi shows them replace the "whole node" assumption.
  if (topo) {
    cl.topology_source = o.topology_file;
    const auto islands = topo->nvlink_islands();
    int min_links = 0;
    cl.islands.clear();
    for (const auto& island : islands) {
      std::vector<int> local;
      for (int g : island)
        if (g < gpn) local.push_back(g);
      if (local.size() > 1) {
        const int links = topo->min_nvlinks(local);
        min_links = min_links == 0 ? links : std::min(min_links, links);
        cl.islands.push_back(local);
      }
    }
    if (cl.islands.empty()) {
      cl.has_nvlink = false;
      if (cl.pcie.kind == LinkKind::NVLink || o.link.empty())
        cl.pcie = link_preset(cl.device.native_link == "pcie5" ? "pcie5" : "pcie4");
    } else {
      cl.has_nvlink = true;
      cl.nvlink = nvlink_with_links(min_links);
    }
  }
  return cl;
}

}  // namespace parallm::plan
