// The hardware catalog of the planner: devices (GPUs and a CPU node), links, clusters of nodes,
// and the calibration file that replaces catalog figures by measured ones.
//
// Units inside the planner are SI: bytes, seconds, FLOP/s, bytes/s. The preset tables and the JSON
// files speak in the units of spec sheets (TFLOP/s, GB/s = 1e9 bytes/s, GiB, microseconds).
#pragma once

#include <map>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "parallm/model/config.h"

namespace parallm::plan {

// Number formats of weights, KV cache and activations.
enum class Precision { FP32, FP16, BF16, FP8, INT8, INT4 };

double precision_bytes(Precision p);  // 4, 2, 2, 1, 1, 0.5
std::string_view precision_name(Precision p);
// "fp32"/"f32"/"float32", "fp16"/"f16"/"float16", "bf16"/"bfloat16", "fp8", "int8", "int4";
// throws std::invalid_argument naming `flag` and the value otherwise.
Precision parse_precision(std::string_view s, std::string_view flag);

struct DeviceSpec {
  std::string name;
  double peak_flops = 0;    // dense bf16/fp16 FLOP/s (no sparsity)
  double mem_bw = 0;        // bytes/s (HBM, or DRAM for the CPU node)
  double mem_capacity = 0;  // bytes
  // Fractions of the peaks that real kernels reach: large GEMMs reach ~60-70% of peak FLOP/s,
  // weight streaming ~80% of memory bandwidth. Measured rates (--flops, --mem-bw, calibration)
  // replace peak x efficiency.
  double flops_efficiency = 0.6;
  double mem_efficiency = 0.8;
  // Memory the model may use: runtime context, allocator slack and fragmentation take the rest.
  double usable_fraction = 0.95;
  std::string native_link;  // the link a node of these usually has inside ("nvlink4", "pcie4")
  bool is_cpu = false;
  int cores = 0;  // CPU node only
  // CPU node: ranks on one node share its memory bandwidth (mem_bw is the node's). GPUs each own
  // theirs.
  bool shared_memory_bw = false;
  // CPU node: what one rank streams alone with its share of the cores (bytes/s; 0 = not known):
  // a rank with one core of two does not reach the node's bandwidth even when it streams alone.
  double rank_mem_bw = 0;

  double effective_flops() const { return peak_flops * flops_efficiency; }
  double effective_mem_bw() const { return mem_bw * mem_efficiency; }
  double usable_memory() const { return mem_capacity * usable_fraction; }
};

enum class LinkKind { NVLink, PCIe, Network, SharedMemory };

struct LinkSpec {
  std::string name;
  LinkKind kind = LinkKind::PCIe;
  double bandwidth = 0;  // bytes/s per direction per device
  double latency = 0;    // seconds per message (alpha): wire, switch and software
};

// Presets: devices "a100-40g", "a100-80g", "h100-sxm", "h100-pcie", "h200", "l40s", "cpu" (the CPU
// preset describes THIS machine: cores and memory from the OS, bandwidth measured unless given).
// Throws std::invalid_argument listing the presets when `name` is unknown.
DeviceSpec device_preset(std::string_view name);
std::vector<std::string> device_preset_names();
// A device from JSON: {"name", "peak_tflops", "mem_bw_gbps", "memory_gib" or "memory_gb",
// optional "flops_efficiency", "mem_efficiency", "usable_fraction", "native_link", "cpu": bool}.
DeviceSpec device_from_json(const nlohmann::json& j, const std::string& source);

// Links: "nvlink3", "nvlink4", "nvlink" (the device's generation; resolved by the caller), "pcie4",
// "pcie5", "pcie" (= pcie4), "ib-hdr", "ib-ndr", "eth-10g", "eth-25g", "eth-100g", "shm" (ranks
// on one host talking through shared memory).
LinkSpec link_preset(std::string_view name);
std::vector<std::string> link_preset_names();
// {"name", "bandwidth_gbps" (GB/s per direction), "latency_us", optional "kind": "nvlink" |
// "pcie" | "network" | "shm"}; a string is a preset name.
LinkSpec link_from_json(const nlohmann::json& j, const std::string& source);
// NVLink with `links` links (as nvidia-smi shows NV#): 25 GB/s per link per direction for NVLink
// 2, 3 and 4 alike.
LinkSpec nvlink_with_links(int links);

// Measures this machine's memory read bandwidth with all cores (bytes/s): streams a buffer much
// larger than the last-level cache a few times and keeps the best run. About 0.1-0.3 s.
double measure_memory_bandwidth(int threads);

// FLOP/s parallm's CPU training kernels reach on this machine (per rank), for the planner's
// training step time: the linear layers' products (kernels::linear_forward, linear_backward_input
// and linear_backward_weight, OpenBLAS) and the causal attention (kernels::attention_forward and
// attention_backward), counted as the planner counts them: 2 flops per multiply-add, attention
// 2 b a s^2 d forward and 4 b a s^2 d backward (the unmasked half of QK^T and PV, and of their
// four gradient products).
struct TrainingRates {
  double gemm_forward = 0, gemm_backward = 0;
  double attention_forward = 0, attention_backward = 0;
  // The LM head's products ([T, hidden] x [vocab, hidden]^T: wider than a layer's, often faster);
  // 0: as the layers'.
  double head_forward = 0, head_backward = 0;
  int threads = 0;  // compute threads per rank they were measured with
  bool measured() const { return gemm_forward > 0; }
};
// Measures them with `ranks` ranks at once (the ranks of a node share its cores and memory; at
// most one per hardware thread, and 16), each with `threads` threads, at the shapes of `c`'s layer
// (TP 1; sides capped at 4096) for micro-batches of `micro_batch` sequences of `seq_len` tokens;
// the ranks' mean. The four products of a layer at up to 512 tokens (fewer for wide layers, at
// least 64: one pass stays near 4 GFLOP), attention on up to 8 query heads of one sequence of up
// to 512 tokens, and the LM head's (vocabulary side capped at 4096 too). Five interleaved rounds of
// the four after a warm-up, each rate the work over the time summed; about 0.3-3 s.
TrainingRates measure_training_rates(const ModelConfig& c, int64_t micro_batch, int64_t seq_len,
                                     int threads, int ranks = 1);

// Measurements that replace catalog figures: `parallm bench comm` writes the comm part,
//   {"backend": "mpi", "world": 2, "ops": {"all_reduce": {"alpha_us": 12.0, "beta_gbps": 3.1},
//                                           "sendrecv": {...}, "all_gather": {...}, ...}}
// where one call on a buffer of n bytes took alpha + n / beta (beta in GB/s = 1e9 bytes/s; n is
// the whole buffer: the vector all-reduced, the all-gather output, the reduce-scatter input, the
// all-to-all send buffer, the message sent). Optional "compute": {"mem_bw_gbps", "gflops"}: the
// per-rank rates decode reached; --mem-bw and --flops say the same from the command line.
struct AlphaBeta {
  double alpha = 0;  // seconds
  double beta = 0;   // bytes/s
  double time(double bytes) const { return alpha + bytes / beta; }
};

struct Calibration {
  std::string source;
  std::string backend;
  int world = 2;
  std::map<std::string, AlphaBeta> ops;  // "all_reduce", "all_gather", "reduce_scatter",
                                         // "all_to_all", "sendrecv", "broadcast"
  double mem_bw = 0;                     // bytes/s per rank, 0 = not measured
  double flops = 0;                      // FLOP/s per rank, 0 = not measured
  // Optional "arrival_skew_us": what a rank of a group collective waits, on average, for the
  // last rank to arrive, in the workload itself (decode: the ranks' halves of a layer finish at
  // different times). An isolated `bench comm` loop, whose ranks arrive together, cannot see it;
  // `bench decode --comm-stats` shows it as all-reduce time per call above alpha + n / beta.
  double arrival_skew = 0;  // seconds per group collective (not point-to-point)
  // Optional "arrival_skew": {"ranks": R, "stream": fs, "compute": fc}, from `bench comm`'s
  // probe: R ranks that start the same slice of work together, the slowest ends it fs of the
  // slice (streaming memory) or fc (arithmetic) after the mean rank. A TP group's collectives
  // wait that for its slowest rank, in proportion to the work between them (the planner scales
  // it from R ranks to the group's size as the expected maximum of normal deviates).
  struct SkewShare {
    int ranks = 0;  // 0: not measured
    double stream = 0, compute = 0;
  } skew_share;
  // Optional "burst_bytes": a link shaped by a token bucket (tc htb, a cloud instance's network)
  // lets this many bytes through at once after an idle spell and holds the rest to its rate. A
  // `bench comm` loop keeps the bucket empty and cannot see it; in decode, where a message follows
  // compute, a message pays alpha + (n - what the bucket refilled in the gap) / beta.
  double burst_bytes = 0;
  // Optional "beside_compute": {"threads": N, "compute_speed": s, "ops": {...}}, from `bench comm
  // --load N`: the collectives timed again while N threads a rank computed beside them, and the
  // share s of its speed alone that the computing kept. On CPU ranks a DP gradient bucket reduced
  // under the backward costs these ops' alpha + n / beta, and the backward runs at s meanwhile
  // (a polling communication thread and the compute threads share the cores: the one waits for
  // time slices, the other gives them up).
  struct BesideCompute {
    int threads = 0;  // 0: not measured
    double compute_speed = 0;
    std::map<std::string, AlphaBeta> ops;
  } beside_compute;
  // Optional "core_sharing": {"efficiency": e, ...}, from `bench comm --share-probe G`: where
  // more ranks than cores take turns on them, two TP groups with work at once lose time to the
  // scheduler (a group's collective completes only when all its ranks hold a core at once), and
  // get e of what perfect sharing of the cores gives. The planner stretches the arithmetic and
  // streaming of ranks taking turns (plan --shared-cores) by 1 / e where more TP groups' ranks
  // have work at once than there are cores. 0: not measured.
  double core_sharing_efficiency = 0;

  const AlphaBeta* op(std::string_view name) const;
  static Calibration from_json(const nlohmann::json& j, const std::string& source);
  static Calibration from_file(const std::string& path);
};

// A cluster: `nodes` nodes of `gpus_per_node` devices each. Inside a node, devices of one NVLink
// island talk over `nvlink`, others over `pcie` (for a CPU node: `pcie` is the shared-memory
// link); nodes talk over `inter`. Global rank r sits on node r / gpus_per_node, local index
// r % gpus_per_node.
struct ClusterSpec {
  DeviceSpec device;
  int nodes = 1;
  int gpus_per_node = 1;
  bool has_nvlink = false;
  LinkSpec nvlink;  // valid when has_nvlink
  LinkSpec pcie;    // the intra-node link between devices not joined by NVLink
  LinkSpec inter;   // between nodes
  // NVLink islands as sets of local indices. Empty with has_nvlink: the whole node is one island
  // (NVSwitch). From `nvidia-smi topo -m` when a topology is given.
  std::vector<std::vector<int>> islands;
  std::string topology_source;  // file the islands came from, "" if none

  int world() const { return nodes * gpus_per_node; }
  int node_of(int rank) const { return rank / gpus_per_node; }
  int island_of(int local) const;  // -1: in no NVLink island
  // The link between two global ranks (their slowest path).
  const LinkSpec& link_between(int a, int b) const;
  // The slowest link inside a group of ranks (what bounds a ring over them).
  const LinkSpec& group_link(const std::vector<int>& ranks) const;
  // Size of the largest NVLink island (1 when there is no NVLink).
  int largest_island() const;
  std::string describe() const;  // "4 x a100-80g, 1 node, nvlink3 (300 GB/s, 3 us)"
};

}  // namespace parallm::plan
