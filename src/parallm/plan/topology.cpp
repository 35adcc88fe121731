#include "parallm/plan/topology.h"

#include <algorithm>
#include <sstream>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"

namespace parallm::plan {
namespace {

std::vector<std::string> split_ws(const std::string& line) {
  std::vector<std::string> out;
  std::istringstream in(line);
  std::string t;
  while (in >> t) out.push_back(t);
  return out;
}

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// No std::regex here: its matcher recurses per character and overflowed the stack on a 26 KB cell.
bool is_gpu_name(const std::string& s) {
  return s.size() > 3 && s.compare(0, 3, "GPU") == 0 && all_digits(std::string_view(s).substr(3));
}

// A cell or device name longer than this is no `nvidia-smi topo -m` output; it is refused (and
// printed cut) rather than carried into messages.
constexpr size_t kMaxToken = 64;

std::string shown(const std::string& token) {
  return token.size() <= kMaxToken ? token : token.substr(0, kMaxToken) + "...";
}

// Column titles that end the device list of the header.
bool is_trailing_title(const std::string& s) {
  return s == "CPU" || s == "NUMA" || s == "GPU" || s == "Affinity" || s == "ID";
}

bool parse_cell(const std::string& cell, TopoLink& link, int& nv) {
  nv = 0;
  if (cell == "X") return link = TopoLink::Self, true;
  if (cell == "PIX") return link = TopoLink::PIX, true;
  if (cell == "PXB") return link = TopoLink::PXB, true;
  if (cell == "PHB") return link = TopoLink::PHB, true;
  if (cell == "NODE") return link = TopoLink::Node, true;
  if (cell == "SYS" || cell == "SOC") return link = TopoLink::Sys, true;  // SOC: older drivers
  if (cell == "NVB") return link = TopoLink::PXB, true;  // NVLink via another GPU: not direct
  // NV# with # the number of links: 1..999 (a GPU has at most 18 today).
  if (cell.size() > 2 && cell.size() <= 5 && cell.compare(0, 2, "NV") == 0 &&
      all_digits(std::string_view(cell).substr(2))) {
    nv = std::stoi(cell.substr(2));
    if (nv <= 0) return false;
    link = TopoLink::NVLink;
    return true;
  }
  return false;
}

}  // namespace

std::string topo_link_name(TopoLink l, int nvlinks) {
  switch (l) {
    case TopoLink::Self:
      return "X";
    case TopoLink::NVLink:
      return cat("NV", nvlinks);
    case TopoLink::PIX:
      return "PIX";
    case TopoLink::PXB:
      return "PXB";
    case TopoLink::PHB:
      return "PHB";
    case TopoLink::Node:
      return "NODE";
    case TopoLink::Sys:
      return "SYS";
  }
  return "?";
}

TopoLink Topology::gpu_link(int i, int j) const {
  return link.at(gpu_columns.at(i)).at(gpu_columns.at(j));
}

int Topology::gpu_nvlinks(int i, int j) const {
  return nvlinks.at(gpu_columns.at(i)).at(gpu_columns.at(j));
}

std::vector<std::vector<int>> Topology::nvlink_islands() const {
  const int n = num_gpus();
  std::vector<int> comp(n, -1);
  std::vector<std::vector<int>> islands;
  for (int s = 0; s < n; ++s) {
    if (comp[s] >= 0) continue;
    std::vector<int> island, stack = {s};
    comp[s] = int(islands.size());
    while (!stack.empty()) {
      const int g = stack.back();
      stack.pop_back();
      island.push_back(g);
      for (int o = 0; o < n; ++o)
        if (comp[o] < 0 && gpu_link(g, o) == TopoLink::NVLink) {
          comp[o] = comp[s];
          stack.push_back(o);
        }
    }
    std::sort(island.begin(), island.end());
    islands.push_back(island);
  }
  return islands;
}

bool Topology::fully_connected(const std::vector<int>& island) const {
  for (int a : island)
    for (int b : island)
      if (a != b && gpu_link(a, b) != TopoLink::NVLink) return false;
  return true;
}

int Topology::min_nvlinks(const std::vector<int>& island) const {
  int best = 0;
  for (int a : island)
    for (int b : island)
      if (a != b && gpu_link(a, b) == TopoLink::NVLink)
        best = best == 0 ? gpu_nvlinks(a, b) : std::min(best, gpu_nvlinks(a, b));
  return best;
}

Topology Topology::parse(const std::string& text, const std::string& source) {
  Topology t;
  t.source = source;
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  bool header = false;
  std::vector<bool> seen;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const auto cells = split_ws(line);
    if (cells.empty()) {
      if (header) break;  // the matrix ends at the first blank line; the legend follows
      continue;
    }
    if (!header && cells[0] != "GPU0") continue;  // banners before the matrix
    if (cells[0] == "Legend:" || cells[0].rfind("Legend", 0) == 0) break;
    for (const auto& c : cells)
      if (c.size() > kMaxToken)
        fail("topology", source, ":", line_no, ": a cell of ", c.size(), " bytes (\"", shown(c),
             "\"); cells and device names have at most ", kMaxToken);
    if (!header) {
      for (const auto& c : cells) {
        if (is_trailing_title(c)) break;
        t.devices.push_back(c);
      }
      if (t.devices.size() > kMaxTopologyDevices)
        fail("topology", source, ":", line_no, ": the header names ", t.devices.size(),
             " devices, more than the ", kMaxTopologyDevices, " a node can have here");
      for (size_t i = 0; i < t.devices.size(); ++i)
        if (is_gpu_name(t.devices[i])) t.gpu_columns.push_back(int(i));
      // GPU columns are named GPU0..GPUn-1 in order; keep ordinals equal to the number.
      for (size_t g = 0; g < t.gpu_columns.size(); ++g)
        if (t.devices[t.gpu_columns[g]] != cat("GPU", g))
          fail("topology", source, ":", line_no, ": expected column GPU", g, ", found \"",
               t.devices[t.gpu_columns[g]], "\"");
      const size_t n = t.devices.size();
      t.link.assign(n, std::vector<TopoLink>(n, TopoLink::Sys));
      t.nvlinks.assign(n, std::vector<int>(n, 0));
      seen.assign(n, false);
      header = true;
      continue;
    }
    const auto it = std::find(t.devices.begin(), t.devices.end(), cells[0]);
    if (it == t.devices.end()) {
      // A row for an unknown device inside the matrix means the capture is mangled.
      fail("topology", source, ":", line_no, ": row \"", cells[0],
           "\" is not one of the header's devices (", join(t.devices, ", "), ")");
    }
    const size_t row = size_t(it - t.devices.begin());
    if (cells.size() < t.devices.size() + 1)
      fail("topology", source, ":", line_no, ": row ", cells[0], " has ", cells.size() - 1,
           " link cells, expected ", t.devices.size());
    for (size_t col = 0; col < t.devices.size(); ++col) {
      TopoLink l;
      int nv = 0;
      if (!parse_cell(cells[col + 1], l, nv))
        fail("topology", source, ":", line_no, ": row ", cells[0], ", column ", t.devices[col],
             ": unknown link \"", cells[col + 1],
             "\" (expected X, NV#, PIX, PXB, PHB, NODE or SYS)");
      if ((l == TopoLink::Self) != (col == row))
        fail("topology", source, ":", line_no, ": row ", cells[0], ", column ", t.devices[col],
             ": \"", cells[col + 1], "\"",
             col == row ? " where X (self) belongs" : " is X off the diagonal");
      t.link[row][col] = l;
      t.nvlinks[row][col] = nv;
    }
    seen[row] = true;
  }
  if (!header)
    fail("topology", source,
         ": no matrix header (a line starting with GPU0) found; is this the "
         "output of `nvidia-smi topo -m`?");
  if (t.gpu_columns.empty()) fail("topology", source, ": the header names no GPU");
  for (size_t i = 0; i < t.devices.size(); ++i)
    if (!seen[i]) fail("topology", source, ": no row for ", t.devices[i]);
  for (int a = 0; a < t.num_gpus(); ++a)
    for (int b = 0; b < t.num_gpus(); ++b)
      if ((t.gpu_link(a, b) == TopoLink::NVLink) != (t.gpu_link(b, a) == TopoLink::NVLink))
        fail("topology", source, ": GPU", a, "-GPU", b, " is ", topo_link_name(t.gpu_link(a, b)),
             " but GPU", b, "-GPU", a, " is ", topo_link_name(t.gpu_link(b, a)));
  return t;
}

Topology Topology::from_file(const std::string& path) {
  return parse(read_text_file(path, kMaxTopologyFileBytes, "topology"), path);
}

}  // namespace parallm::plan
