#include "parallm/plan/hardware.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"

namespace parallm::plan {
namespace {

using nlohmann::json;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct DevicePreset {
  const char* name;
  double tflops, bw_gbps, mem_gib;
  const char* link;
};

// Dense bf16 tensor-core peaks and HBM bandwidths from the vendors' data sheets.
constexpr DevicePreset kDevices[] = {
    {"a100-40g", 312, 1555, 40, "nvlink3"},       {"a100-80g", 312, 2039, 80, "nvlink3"},
    {"h100-sxm", 989, 3350, 80, "nvlink4"},       {"h100-pcie", 756, 2000, 80, "pcie5"},
    {"h200", 989, 4800, 141e9 / kGiB, "nvlink4"}, {"l40s", 362, 864, 48e9 / kGiB, "pcie4"},
    {"rtx4090", 82.6, 1008, 24, "pcie4"},  // bf16 with fp32 accumulation, as frameworks run it
};

struct LinkPreset {
  const char* name;
  LinkKind kind;
  double gbps;  // GB/s per direction per device, what transfers reach
  double us;    // per-message latency, including the collective library's software cost
};

constexpr LinkPreset kLinks[] = {
    {"nvlink3", LinkKind::NVLink, 300, 2},  // A100: 12 links x 25 GB/s
    {"nvlink4", LinkKind::NVLink, 450, 2},  // H100/H200: 18 links x 25 GB/s
    {"pcie4", LinkKind::PCIe, 25, 8},       // x16: 32 GB/s raw, ~25 reached
    {"pcie5", LinkKind::PCIe, 50, 8},       // x16: 64 GB/s raw
    {"ib-hdr", LinkKind::Network, 25, 6},   // 200 Gb/s per NIC
    {"ib-ndr", LinkKind::Network, 50, 5},   // 400 Gb/s per NIC
    {"eth-10g", LinkKind::Network, 1.25, 30},
    {"eth-25g", LinkKind::Network, 3.125, 25},
    {"eth-100g", LinkKind::Network, 12.5, 15},
    {"shm", LinkKind::SharedMemory, 10, 2},  // ranks on one host; calibrate for real numbers
};

// The path of `field` inside `source` for messages: "file.json: gpu.mem_bw_gbps" when source
// already names a place inside its file ("file.json: gpu"), else "file.json: mem_bw_gbps".
std::string where(const std::string& source, std::string_view field) {
  return source.find(": ") != std::string::npos ? cat(source, ".", field) : cat(source, ": ", field);
}

// A required share in (0, 1] at obj[key] (`what` says whose), or one line naming it.
double share_in_unit(const json& obj, const char* key, const std::string& at, const char* what) {
  auto it = obj.find(key);
  if (it == obj.end()) fail("calibrate", where(at, key), " is missing (required)");
  if (!it->is_number() || !std::isfinite(it->get<double>()) || it->get<double>() <= 0 ||
      it->get<double>() > 1)
    fail("calibrate", where(at, key), " must be ", what, ", in (0, 1], got ", json_preview(*it));
  return it->get<double>();
}

// A positive finite number (JSON has no NaN, but 1e999 parses as infinity).
double number(const json& j, const char* field, const std::string& source, bool required,
              double fallback = 0, const char* component = "hardware") {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    if (required) fail(component, where(source, field), " is missing (required)");
    return fallback;
  }
  if (!it->is_number())
    fail(component, where(source, field), " must be a number, got ", json_preview(*it));
  const double v = it->get<double>();
  if (!std::isfinite(v) || !(v > 0))
    fail(component, where(source, field), " must be a positive number, got ", json_preview(*it));
  return v;
}

std::string string_field(const json& j, const char* field, const std::string& source,
                         const std::string& fallback, const char* component = "hardware") {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string())
    fail(component, where(source, field), " must be a string, got ", json_preview(*it));
  return it->get<std::string>();
}

bool bool_field(const json& j, const char* field, const std::string& source, bool fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean())
    fail("hardware", where(source, field), " must be true or false, got ", json_preview(*it));
  return it->get<bool>();
}

// A name from the user, cut for a message: a 1 MB "device name" must not fill the terminal.
std::string shown(std::string_view name) {
  return name.size() <= 64 ? std::string(name) : cat(name.substr(0, 64), "... (", name.size(),
                                                      " bytes)");
}

std::string fmt_num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

double precision_bytes(Precision p) {
  switch (p) {
    case Precision::FP32:
      return 4;
    case Precision::FP16:
    case Precision::BF16:
      return 2;
    case Precision::FP8:
    case Precision::INT8:
      return 1;
    case Precision::INT4:
      return 0.5;
  }
  return 0;
}

std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::FP32:
      return "fp32";
    case Precision::FP16:
      return "fp16";
    case Precision::BF16:
      return "bf16";
    case Precision::FP8:
      return "fp8";
    case Precision::INT8:
      return "int8";
    case Precision::INT4:
      return "int4";
  }
  return "?";
}

Precision parse_precision(std::string_view s, std::string_view flag) {
  if (s == "fp32" || s == "f32" || s == "float32") return Precision::FP32;
  if (s == "fp16" || s == "f16" || s == "float16") return Precision::FP16;
  if (s == "bf16" || s == "bfloat16") return Precision::BF16;
  if (s == "fp8" || s == "f8") return Precision::FP8;
  if (s == "int8" || s == "q8") return Precision::INT8;
  if (s == "int4" || s == "q4") return Precision::INT4;
  fail("plan", flag, ": unknown number format \"", s,
       "\" (choose fp32, fp16, bf16, fp8, int8, int4)");
}

DeviceSpec device_preset(std::string_view name) {
  for (const auto& p : kDevices) {
    if (name != p.name) continue;
    DeviceSpec d;
    d.name = p.name;
    d.peak_flops = p.tflops * 1e12;
    d.mem_bw = p.bw_gbps * 1e9;
    d.mem_capacity = p.mem_gib * kGiB;
    d.native_link = p.link;
    return d;
  }
  if (name == "cpu") {
    DeviceSpec d;
    d.name = "cpu";
    d.is_cpu = true;
    d.shared_memory_bw = true;
    d.cores = std::max(1u, std::thread::hardware_concurrency());
    // A guess (AVX2 FMA at ~3 GHz, half reached); decode is memory-bound, pass --flops to be exact.
    d.peak_flops = d.cores * 50e9;
    d.flops_efficiency = 0.5;
    d.mem_bw = 0;  // measured by the caller (measure_memory_bandwidth) or given by --mem-bw
    d.mem_efficiency = 1.0;  // the measured figure is already what a stream reaches
    d.mem_capacity = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
    d.usable_fraction = 0.8;
    d.native_link = "shm";
    return d;
  }
  fail("hardware", "--gpu: unknown device \"", shown(name),
       "\" (presets: ", join(device_preset_names(), ", "), "; or a JSON file)");
}

std::vector<std::string> device_preset_names() {
  std::vector<std::string> names;
  for (const auto& p : kDevices) names.push_back(p.name);
  names.push_back("cpu");
  return names;
}

DeviceSpec device_from_json(const json& j, const std::string& source) {
  if (j.is_string()) return device_preset(j.get<std::string>());
  if (!j.is_object())
    fail("hardware", source, ": a device must be a preset name or an object, got ",
         json_preview(j));
  DeviceSpec d;
  d.name = string_field(j, "name", source, "custom");
  d.is_cpu = bool_field(j, "cpu", source, false);
  d.shared_memory_bw = d.is_cpu;
  d.peak_flops = number(j, "peak_tflops", source, true) * 1e12;
  d.mem_bw = number(j, "mem_bw_gbps", source, true) * 1e9;
  if (j.contains("memory_gib"))
    d.mem_capacity = number(j, "memory_gib", source, true) * kGiB;
  else
    d.mem_capacity = number(j, "memory_gb", source, true) * 1e9;
  d.flops_efficiency = number(j, "flops_efficiency", source, false, d.flops_efficiency);
  d.mem_efficiency = number(j, "mem_efficiency", source, false, d.mem_efficiency);
  d.usable_fraction = number(j, "usable_fraction", source, false, d.usable_fraction);
  const double cores = number(j, "cores", source, false, 0);
  if (cores > 1e6 || cores != std::floor(cores))
    fail("hardware", where(source, "cores"), " must be an integer in 1..1000000, got ", cores);
  d.cores = int(cores);
  d.native_link = string_field(j, "native_link", source, d.is_cpu ? "shm" : "pcie4");
  if (d.flops_efficiency > 1 || d.mem_efficiency > 1 || d.usable_fraction > 1)
    fail("hardware", source, ": efficiencies and usable_fraction must be in (0, 1]");
  return d;
}

LinkSpec link_preset(std::string_view name) {
  if (name == "pcie") name = "pcie4";
  for (const auto& p : kLinks)
    if (name == p.name) return {p.name, p.kind, p.gbps * 1e9, p.us * 1e-6};
  fail("hardware", "unknown link \"", shown(name), "\" (presets: nvlink, ",
       join(link_preset_names(), ", "), ")");
}

std::vector<std::string> link_preset_names() {
  std::vector<std::string> names;
  for (const auto& p : kLinks) names.push_back(p.name);
  return names;
}

LinkSpec link_from_json(const json& j, const std::string& source) {
  if (j.is_string()) return link_preset(j.get<std::string>());
  if (!j.is_object())
    fail("hardware", source, ": a link must be a preset name or an object, got ",
         json_preview(j));
  LinkSpec l;
  l.name = string_field(j, "name", source, "custom-link");
  l.bandwidth = number(j, "bandwidth_gbps", source, true) * 1e9;
  l.latency = number(j, "latency_us", source, true) * 1e-6;
  const std::string kind = string_field(j, "kind", source, "pcie");
  if (kind == "nvlink")
    l.kind = LinkKind::NVLink;
  else if (kind == "pcie")
    l.kind = LinkKind::PCIe;
  else if (kind == "network")
    l.kind = LinkKind::Network;
  else if (kind == "shm")
    l.kind = LinkKind::SharedMemory;
  else
    fail("hardware", where(source, "kind"), " \"", shown(kind),
         "\" is not one of nvlink, pcie, network, shm");
  return l;
}

LinkSpec nvlink_with_links(int links) {
  LinkSpec l = link_preset("nvlink4");
  l.name = cat("nvlink x", links);
  l.bandwidth = 25e9 * links;
  return l;
}

double measure_memory_bandwidth(int threads) {
  threads = std::max(1, threads);
  // 256 MiB: far beyond any last-level cache, small enough to be quick.
  const size_t n = (size_t(256) << 20) / sizeof(uint64_t);
  std::vector<uint64_t> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = i;
  std::vector<uint64_t> sums(threads * 8);  // padded: one cache line per thread
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t lo = n * t / threads, hi = n * (t + 1) / threads;
        uint64_t a = 0, b = 0, c = 0, d = 0;
        for (size_t i = lo; i + 4 <= hi; i += 4) {
          a += buf[i];
          b += buf[i + 1];
          c += buf[i + 2];
          d += buf[i + 3];
        }
        sums[t * 8] = a + b + c + d;
      });
    }
    for (auto& th : pool) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n * sizeof(uint64_t)) / s);
  }
  // Keep the sums observable so that the loads are not optimised away.
  volatile uint64_t sink = 0;
  for (auto v : sums) sink = sink + v;
  return best;
}

const AlphaBeta* Calibration::op(std::string_view name) const {
  auto it = ops.find(std::string(name));
  return it == ops.end() ? nullptr : &it->second;
}

namespace {

// A calibration's "ops" object (at `source`, e.g. "cal.json" or "cal.json: beside_compute") into
// `out`, the names' spellings unified.
void parse_ops(const json& ops, const std::string& source, std::map<std::string, AlphaBeta>* out) {
  if (!ops.is_object()) fail("calibrate", source, ": field \"ops\" must be an object");
  for (const auto& [name, v] : ops.items()) {
    // The key as a short JSON string: a hostile name must not fill the message.
    const std::string at =
        cat(source, ": ops.", name.size() <= 40 ? name : name.substr(0, 40) + "...");
    if (!v.is_object())
      fail("calibrate", at, " must be an object with alpha_us and beta_gbps, got ",
           json_preview(v));
    AlphaBeta ab;
    auto a = v.find("alpha_us");
    if (a == v.end() || !a->is_number() || !std::isfinite(a->get<double>()) || a->get<double>() < 0)
      fail("calibrate", at, ".alpha_us must be a non-negative number, got ",
           a == v.end() ? std::string("nothing") : json_preview(*a));
    ab.alpha = a->get<double>() * 1e-6;
    ab.beta = number(v, "beta_gbps", at, true, 0, "calibrate") * 1e9;
    std::string key = name;
    if (key == "send_recv" || key == "p2p" || key == "send") key = "sendrecv";
    if (key == "allreduce") key = "all_reduce";
    if (key == "allgather") key = "all_gather";
    if (key == "reducescatter") key = "reduce_scatter";
    if (key == "alltoall") key = "all_to_all";
    (*out)[key] = ab;
  }
}

}  // namespace

Calibration Calibration::from_json(const json& j, const std::string& source) {
  if (!j.is_object()) fail("calibrate", source, ": expected a JSON object");
  Calibration c;
  c.source = source;
  c.backend = string_field(j, "backend", source, "unknown", "calibrate");
  if (j.contains("world")) {
    const json& w = j["world"];
    if (!w.is_number_integer() || w.get<int64_t>() < 2 || w.get<int64_t>() > (1 << 20))
      fail("calibrate", source, ": world must be an integer in 2..", 1 << 20, ", got ",
           json_preview(w));
    c.world = int(w.get<int64_t>());
  }
  if (j.contains("ops")) parse_ops(j["ops"], source, &c.ops);
  if (j.contains("compute")) {
    const json& comp = j["compute"];
    if (!comp.is_object())
      fail("calibrate", source, ": compute must be an object, got ", json_preview(comp));
    c.mem_bw = number(comp, "mem_bw_gbps", source + ": compute", false, 0, "calibrate") * 1e9;
    c.flops = number(comp, "gflops", source + ": compute", false, 0, "calibrate") * 1e9;
  }
  c.arrival_skew = number(j, "arrival_skew_us", source, false, 0, "calibrate") * 1e-6;
  c.burst_bytes = number(j, "burst_bytes", source, false, 0, "calibrate");
  if (j.contains("arrival_skew")) {
    const json& sk = j["arrival_skew"];
    const std::string at = source + ": arrival_skew";
    if (!sk.is_object())
      fail("calibrate", at, " must be an object {ranks, stream, compute}, got ", json_preview(sk));
    const double ranks = number(sk, "ranks", at, true, 0, "calibrate");
    if (ranks < 2 || ranks != std::floor(ranks) || ranks > 1e6)
      fail("calibrate", where(at, "ranks"), " must be a whole number of ranks >= 2, got ",
           json_preview(sk["ranks"]));
    c.skew_share.ranks = int(ranks);
    for (auto [key, out] :
         {std::pair{"stream", &c.skew_share.stream}, std::pair{"compute", &c.skew_share.compute}}) {
      auto it = sk.find(key);
      if (it == sk.end()) fail("calibrate", where(at, key), " is missing (required)");
      if (!it->is_number() || !std::isfinite(it->get<double>()) || it->get<double>() < 0 ||
          it->get<double>() >= 1)
        fail("calibrate", where(at, key), " must be a fraction of a slice in [0, 1), got ",
             json_preview(*it));
      *out = it->get<double>();
    }
  }
  if (j.contains("beside_compute")) {
    const json& bc = j["beside_compute"];
    const std::string at = source + ": beside_compute";
    if (!bc.is_object())
      fail("calibrate", at, " must be an object {threads, compute_speed, ops}, got ",
           json_preview(bc));
    const double threads = number(bc, "threads", at, true, 0, "calibrate");
    if (threads < 1 || threads != std::floor(threads) || threads > 1e6)
      fail("calibrate", where(at, "threads"), " must be a whole number of threads >= 1, got ",
           json_preview(bc["threads"]));
    c.beside_compute.threads = int(threads);
    c.beside_compute.compute_speed =
        share_in_unit(bc, "compute_speed", at, "the share of its speed the computing kept");
    if (!bc.contains("ops")) fail("calibrate", where(at, "ops"), " is missing (required)");
    parse_ops(bc["ops"], at, &c.beside_compute.ops);
  }
  if (j.contains("core_sharing")) {
    const json& cs = j["core_sharing"];
    const std::string at = source + ": core_sharing";
    if (!cs.is_object())
      fail("calibrate", at, " must be an object {efficiency, ...}, got ", json_preview(cs));
    c.core_sharing_efficiency =
        share_in_unit(cs, "efficiency", at, "the share of perfect core sharing the ranks got");
  }
  if (c.ops.empty() && c.mem_bw == 0 && c.flops == 0)
    fail("calibrate", source, ": no \"ops\" and no \"compute\": nothing to calibrate with");
  return c;
}

Calibration Calibration::from_file(const std::string& path) {
  return from_json(read_json_file(path, "calibrate"), path);
}

int ClusterSpec::island_of(int local) const {
  if (!has_nvlink) return -1;
  if (islands.empty()) return 0;
  for (size_t i = 0; i < islands.size(); ++i)
    if (std::find(islands[i].begin(), islands[i].end(), local) != islands[i].end()) return int(i);
  return -1;
}

const LinkSpec& ClusterSpec::link_between(int a, int b) const {
  if (node_of(a) != node_of(b)) return inter;
  const int ia = island_of(a % gpus_per_node), ib = island_of(b % gpus_per_node);
  if (ia >= 0 && ia == ib) return nvlink;
  return pcie;
}

const LinkSpec& ClusterSpec::group_link(const std::vector<int>& ranks) const {
  // A ring over the group in rank order: neighbours, and the last back to the first.
  const size_t n = ranks.size();
  const LinkSpec* worst = nullptr;
  for (size_t i = 0; n >= 2 && i < (n == 2 ? 1 : n); ++i) {
    const LinkSpec& l = link_between(ranks[i], ranks[(i + 1) % n]);
    if (!worst || l.bandwidth < worst->bandwidth ||
        (l.bandwidth == worst->bandwidth && l.latency > worst->latency))
      worst = &l;
  }
  return worst ? *worst : (has_nvlink ? nvlink : pcie);
}

int ClusterSpec::largest_island() const {
  if (!has_nvlink) return 1;
  if (islands.empty()) return gpus_per_node;
  size_t best = 1;
  for (const auto& i : islands) best = std::max(best, i.size());
  return int(best);
}

std::string ClusterSpec::describe() const {
  auto link = [](const LinkSpec& l) {
    return cat(l.name, " (", fmt_num(l.bandwidth / 1e9), " GB/s, ", fmt_num(l.latency * 1e6),
               " us)");
  };
  std::string s = cat(world(), " x ", device.name, ", ", nodes, nodes == 1 ? " node" : " nodes");
  if (nodes > 1) s += cat(" of ", gpus_per_node);
  if (has_nvlink) {
    s += cat("; inside a node: ", link(nvlink));
    if (!islands.empty())
      s += cat(" in islands of up to ", largest_island(), ", else ", link(pcie));
  } else {
    s += cat("; inside a node: ", link(pcie));
  }
  if (nodes > 1) s += cat("; between nodes: ", link(inter));
  if (!topology_source.empty()) s += cat(" (topology from ", topology_source, ")");
  return s;
}

}  // namespace parallm::plan
