// Alpha-beta collective costs, calibration, topology parsing (real captures in
// tests/fixtures/nvidia-smi-topo/) and the cluster built from them.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "parallm/plan/cluster.h"
#include "parallm/plan/comm_model.h"
#include "parallm/plan/estimate.h"
#include "parallm/plan/topology.h"

namespace parallm::plan {
namespace {

const std::string kFixtures = std::string(PARALLM_SOURCE_DIR) + "/tests/fixtures/nvidia-smi-topo/";

LinkSpec link(double gbps, double us) {
  return {"test", LinkKind::PCIe, gbps * 1e9, us * 1e-6};
}

TEST(CommModel, AlphaBetaFormulas) {
  const LinkSpec l = link(10, 5);  // 10 GB/s, 5 us
  // Large all-reduce: ring, 2 (p-1) alpha + 2 (p-1)/p n / beta.
  const double n = 64e6;
  CommCost c = collective_cost(Collective::AllReduce, n, 4, l);
  EXPECT_EQ(c.algorithm, "ring");
  EXPECT_DOUBLE_EQ(c.seconds, 6 * 5e-6 + 1.5 * n / 10e9);
  EXPECT_DOUBLE_EQ(c.bytes_sent, 1.5 * n);
  // Small all-reduce: latency dominates; recursive doubling's 2 steps beat the ring's 6.
  c = collective_cost(Collective::AllReduce, 16384, 4, l);
  EXPECT_EQ(c.algorithm, "recursive-doubling");
  EXPECT_DOUBLE_EQ(c.seconds, 2 * (5e-6 + 16384 / 10e9));
  // Non powers of two pay two extra steps in recursive doubling (p=3: 1 + 2).
  EXPECT_DOUBLE_EQ(collective_cost(Collective::AllReduce, 8, 3, l).seconds, 3 * (5e-6 + 8 / 10e9));
  EXPECT_DOUBLE_EQ(collective_cost(Collective::P2P, 1e6, 2, l).seconds, 5e-6 + 1e6 / 10e9);
  EXPECT_DOUBLE_EQ(collective_cost(Collective::AllToAll, 8e6, 8, l).seconds,
                   7 * 5e-6 + 7.0 / 8 * 8e6 / 10e9);
  EXPECT_DOUBLE_EQ(collective_cost(Collective::AllGather, 8e6, 4, l).seconds,
                   std::min(3 * 5e-6, 2 * 5e-6) + 0.75 * 8e6 / 10e9);
  EXPECT_EQ(collective_cost(Collective::AllReduce, 1e6, 1, l).seconds, 0.0);
}

TEST(CommModel, LatencyDominatesDecodeSizedMessages) {
  // The point of alpha-beta: at 16 KiB over PCIe, a bandwidth-only model is off by >10x.
  const LinkSpec pcie = link(25, 8);
  const double n = 16384;
  const double bandwidth_only = 2 * 3.0 / 4 * n / 25e9;
  const double t = collective_cost(Collective::AllReduce, n, 4, pcie).seconds;
  EXPECT_GT(t / bandwidth_only, 10);
}

TEST(CommModel, CalibrationReplacesTheFormula) {
  const auto j = nlohmann::json::parse(R"({"backend": "mpi", "world": 2, "ops": {
      "all_reduce": {"alpha_us": 20, "beta_gbps": 2.5},
      "sendrecv": {"alpha_us": 4, "beta_gbps": 5}}})");
  const Calibration cal = Calibration::from_json(j, "comm.json");
  const LinkSpec l = link(100, 1);
  // At the measured world: alpha + n / beta exactly.
  EXPECT_DOUBLE_EQ(collective_cost(Collective::AllReduce, 32768, 2, l, &cal).seconds,
                   20e-6 + 32768 / 2.5e9);
  EXPECT_DOUBLE_EQ(collective_cost(Collective::P2P, 1000, 2, l, &cal).seconds, 4e-6 + 1000 / 5e9);
  // At 4 ranks: steps (p-1)/(w-1) = 3, volume (3/4)/(1/2) = 1.5.
  EXPECT_DOUBLE_EQ(collective_cost(Collective::AllReduce, 1e6, 4, l, &cal).seconds,
                   3 * 20e-6 + 1.5e6 / 2.5e9);
  // Not measured: built from the calibrated sendrecv.
  const CommCost ag = collective_cost(Collective::AllGather, 1e6, 2, l, &cal);
  EXPECT_DOUBLE_EQ(ag.seconds, 4e-6 + 0.5e6 / 5e9);
  EXPECT_NE(ag.algorithm.find("calibrated sendrecv"), std::string::npos);

  EXPECT_THROW(Calibration::from_json(
                   nlohmann::json::parse(R"({"ops": {"all_reduce": {"alpha_us": 1}}})"), "x"),
               std::invalid_argument);
  EXPECT_THROW(Calibration::from_json(nlohmann::json::parse(R"({"world": 1, "ops": {}})"), "x"),
               std::invalid_argument);
  EXPECT_THROW(Calibration::from_json(nlohmann::json::parse(R"({"backend": "mpi"})"), "x"),
               std::invalid_argument);
  try {
    Calibration::from_json(
        nlohmann::json::parse(R"({"ops": {"all_reduce": {"alpha_us": 1, "beta_gbps": -2}}})"),
        "comm.json");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("beta_gbps"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("comm.json"), std::string::npos) << e.what();
  }
}

TEST(CommModel, ArrivalSkewAddsToGroupCollectivesOnly) {
  // scripts/emulate-cluster.sh grid: decode's all-reduces wait for the later rank; the wait,
  // measured once, is added to every group collective and to no point-to-point message.
  const auto j = nlohmann::json::parse(R"({"backend": "mpi", "world": 2, "arrival_skew_us": 100,
      "ops": {"all_reduce": {"alpha_us": 20, "beta_gbps": 2.5},
              "sendrecv": {"alpha_us": 4, "beta_gbps": 5}}})");
  const Calibration cal = Calibration::from_json(j, "comm.json");
  EXPECT_DOUBLE_EQ(cal.arrival_skew, 100e-6);
  const LinkSpec l = link(100, 1);
  const CommCost ar = collective_cost(Collective::AllReduce, 1024, 2, l, &cal);
  EXPECT_DOUBLE_EQ(ar.seconds, 100e-6 + 20e-6 + 1024 / 2.5e9);
  EXPECT_NE(ar.algorithm.find("arrival skew"), std::string::npos);
  // Built from the calibrated sendrecv: skew too.
  EXPECT_DOUBLE_EQ(collective_cost(Collective::AllGather, 1e6, 2, l, &cal).seconds,
                   100e-6 + 4e-6 + 0.5e6 / 5e9);
  EXPECT_DOUBLE_EQ(collective_cost(Collective::P2P, 1000, 2, l, &cal).seconds, 4e-6 + 1000 / 5e9);
  // Absent: no skew; negative or not a number: a clear error naming the field.
  EXPECT_DOUBLE_EQ(Calibration::from_json(nlohmann::json::parse(
                       R"({"ops": {"sendrecv": {"alpha_us": 1, "beta_gbps": 1}}})"), "x")
                       .arrival_skew,
                   0);
  for (const char* bad : {R"({"arrival_skew_us": -3, "ops": {"sendrecv": {"alpha_us": 1, "beta_gbps": 1}}})",
                          R"({"arrival_skew_us": "x", "ops": {"sendrecv": {"alpha_us": 1, "beta_gbps": 1}}})"}) {
    try {
      Calibration::from_json(nlohmann::json::parse(bad), "c.json");
      ADD_FAILURE() << bad;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("arrival_skew_us"), std::string::npos) << e.what();
    }
  }
}

// Each (text, needle) of `bad` refused by `parse` with one line naming the file and `needle`.
template <size_t N, typename Parse>
void expect_refusals(const std::pair<const char*, const char*> (&bad)[N], Parse parse) {
  for (const auto& [text, needle] : bad) {
    try {
      parse(text);
      ADD_FAILURE() << text;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("c.json"), std::string::npos) << e.what();
    }
  }
}

TEST(CommModel, ArrivalSkewShareParsesAndRefusesBadInput) {
  // bench comm's probe: {"ranks", "stream", "compute"}, shares of a slice of work.
  const char* ops = R"("ops": {"sendrecv": {"alpha_us": 1, "beta_gbps": 1}})";
  auto parse = [&](const std::string& skew) {
    return Calibration::from_json(nlohmann::json::parse("{" + skew + ops + "}"), "c.json");
  };
  const Calibration cal =
      parse(R"("arrival_skew": {"ranks": 2, "stream": 0.04, "compute": 0.09, "stream_ms": 2},)");
  EXPECT_EQ(cal.skew_share.ranks, 2);
  EXPECT_DOUBLE_EQ(cal.skew_share.stream, 0.04);
  EXPECT_DOUBLE_EQ(cal.skew_share.compute, 0.09);
  EXPECT_EQ(parse("").skew_share.ranks, 0);  // absent: not measured
  EXPECT_EQ(parse(R"("arrival_skew": {"ranks": 3, "stream": 0, "compute": 0},)").skew_share.ranks,
            3);
  const std::pair<const char*, const char*> bad[] = {
      {R"("arrival_skew": 0.05,)", "arrival_skew must be an object"},
      {R"("arrival_skew": {"stream": 0.1, "compute": 0.1},)", "ranks"},
      {R"("arrival_skew": {"ranks": 1, "stream": 0.1, "compute": 0.1},)", "ranks"},
      {R"("arrival_skew": {"ranks": 2.5, "stream": 0.1, "compute": 0.1},)", "ranks"},
      {R"("arrival_skew": {"ranks": 2, "compute": 0.1},)", "stream"},
      {R"("arrival_skew": {"ranks": 2, "stream": -0.1, "compute": 0.1},)", "stream"},
      {R"("arrival_skew": {"ranks": 2, "stream": 0.1, "compute": 1.5},)", "compute"},
      {R"("arrival_skew": {"ranks": 2, "stream": 0.1, "compute": "x"},)", "compute"}};
  expect_refusals(bad, parse);
}

// bench comm --load's "beside_compute": the collectives timed beside computing threads and what
// the computing kept of its speed; its ops parse as the top-level ones do.
TEST(CommModel, BesideComputeParsesAndRefusesBadInput) {
  const char* ops = R"("ops": {"all_reduce": {"alpha_us": 1, "beta_gbps": 1}})";
  auto parse = [&](const std::string& beside) {
    return Calibration::from_json(nlohmann::json::parse("{" + beside + ops + "}"), "c.json");
  };
  const Calibration cal = parse(R"("beside_compute": {"threads": 2, "compute_speed": 0.45,
      "ops": {"allreduce": {"alpha_us": 3500, "beta_gbps": 0.15}}},)");
  EXPECT_EQ(cal.beside_compute.threads, 2);
  EXPECT_DOUBLE_EQ(cal.beside_compute.compute_speed, 0.45);
  ASSERT_EQ(cal.beside_compute.ops.count("all_reduce"), 1u);  // the spelling unified
  EXPECT_DOUBLE_EQ(cal.beside_compute.ops.at("all_reduce").alpha, 3500e-6);
  EXPECT_DOUBLE_EQ(cal.beside_compute.ops.at("all_reduce").beta, 0.15e9);
  EXPECT_DOUBLE_EQ(cal.op("all_reduce")->alpha, 1e-6);  // the top level's untouched
  EXPECT_EQ(parse("").beside_compute.threads, 0);       // absent: not measured
  const std::pair<const char*, const char*> bad[] = {
      {R"("beside_compute": 1,)", "beside_compute must be an object"},
      {R"("beside_compute": {"compute_speed": 0.5, "ops": {}},)", "threads"},
      {R"("beside_compute": {"threads": 0, "compute_speed": 0.5, "ops": {}},)", "threads"},
      {R"("beside_compute": {"threads": 1, "ops": {}},)", "compute_speed"},
      {R"("beside_compute": {"threads": 1, "compute_speed": 0, "ops": {}},)", "compute_speed"},
      {R"("beside_compute": {"threads": 1, "compute_speed": 1.5, "ops": {}},)", "compute_speed"},
      {R"("beside_compute": {"threads": 1, "compute_speed": 0.5},)", "beside_compute.ops"},
      {R"("beside_compute": {"threads": 1, "compute_speed": 0.5, "ops": {"all_reduce": 3}},)",
       "beside_compute: ops.all_reduce"},
      {R"("beside_compute": {"threads": 1, "compute_speed": 0.5,
          "ops": {"all_reduce": {"alpha_us": -1, "beta_gbps": 1}}},)",
       "alpha_us"}};
  expect_refusals(bad, parse);
}

// bench comm --share-probe's "core_sharing": the share of perfect core sharing that TP groups
// taking turns on shared cores got; only its efficiency is read.
TEST(CommModel, CoreSharingParsesAndRefusesBadInput) {
  const char* ops = R"("ops": {"all_reduce": {"alpha_us": 1, "beta_gbps": 1}})";
  auto parse = [&](const std::string& sharing) {
    return Calibration::from_json(nlohmann::json::parse("{" + sharing + ops + "}"), "c.json");
  };
  EXPECT_DOUBLE_EQ(parse(R"("core_sharing": {"groups": 2, "group_size": 2, "efficiency": 0.85},)")
                       .core_sharing_efficiency,
                   0.85);
  EXPECT_DOUBLE_EQ(parse(R"("core_sharing": {"efficiency": 1},)").core_sharing_efficiency, 1.0);
  EXPECT_EQ(parse("").core_sharing_efficiency, 0.0);  // absent: not measured
  const std::pair<const char*, const char*> bad[] = {
      {R"("core_sharing": 0.9,)", "core_sharing must be an object"},
      {R"("core_sharing": {"groups": 2},)", "core_sharing.efficiency is missing"},
      {R"("core_sharing": {"efficiency": 0},)", "core_sharing.efficiency"},
      {R"("core_sharing": {"efficiency": 1.2},)", "core_sharing.efficiency"},
      {R"("core_sharing": {"efficiency": "high"},)", "core_sharing.efficiency"}};
  expect_refusals(bad, parse);
}

TEST(Topology, ParsesH100NvlinkCapture) {
  const Topology t = Topology::from_file(kFixtures + "h100-8gpu-nvlink.txt");
  ASSERT_EQ(t.num_gpus(), 8);
  EXPECT_EQ(t.devices.size(), 8u);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      EXPECT_EQ(t.gpu_link(i, j), i == j ? TopoLink::Self : TopoLink::NVLink);
      if (i != j) {
        EXPECT_EQ(t.gpu_nvlinks(i, j), 18);
      }
    }
  const auto islands = t.nvlink_islands();
  ASSERT_EQ(islands.size(), 1u);
  EXPECT_EQ(islands[0].size(), 8u);
  EXPECT_TRUE(t.fully_connected(islands[0]));
  EXPECT_EQ(t.min_nvlinks(islands[0]), 18);
}

TEST(Topology, ParsesRtx4090PcieCaptureWithNics) {
  const Topology t = Topology::from_file(kFixtures + "rtx4090-8gpu-pcie-nics.txt");
  ASSERT_EQ(t.num_gpus(), 8);
  ASSERT_EQ(t.devices.size(), 10u);  // 8 GPUs + 2 NICs
  EXPECT_EQ(t.devices[8], "NIC0");
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j)
      EXPECT_EQ(t.gpu_link(i, j), i == j ? TopoLink::Self : TopoLink::Sys);
  EXPECT_EQ(t.link[6][8], TopoLink::PHB);    // GPU6 - NIC0
  EXPECT_EQ(t.link[8][9], TopoLink::PIX);    // NIC0 - NIC1
  EXPECT_EQ(t.nvlink_islands().size(), 8u);  // no NVLink: every GPU alone
}

TEST(Topology, FindsSeparateIslands) {
  // Two NVLink pairs joined only through the host: TP=2 fits an island, TP=4 does not.
  const std::string text =
      "\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\n"
      "GPU0\t X \tNV4\tSYS\tSYS\t0-15\t0\n"
      "GPU1\tNV4\t X \tSYS\tSYS\t0-15\t0\n"
      "GPU2\tSYS\tSYS\t X \tNV4\t16-31\t1\n"
      "GPU3\tSYS\tSYS\tNV4\t X \t16-31\t1\n"
      "\nLegend:\n  X = Self\n";
  const Topology t = Topology::parse(text, "pairs.txt");
  const auto islands = t.nvlink_islands();
  ASSERT_EQ(islands.size(), 2u);
  EXPECT_EQ(islands[0], (std::vector<int>{0, 1}));
  EXPECT_EQ(islands[1], (std::vector<int>{2, 3}));

  const auto path = std::filesystem::temp_directory_path() / "parallm_pairs_topo.txt";
  std::ofstream(path) << text;
  ClusterOptions o;
  o.gpu = "h100-pcie";
  o.topology_file = path.string();
  const ClusterSpec cl = build_cluster(o);
  std::filesystem::remove(path);
  EXPECT_EQ(cl.gpus_per_node, 4);
  EXPECT_TRUE(cl.has_nvlink);
  EXPECT_EQ(cl.largest_island(), 2);
  EXPECT_DOUBLE_EQ(cl.nvlink.bandwidth, 4 * 25e9);
  EXPECT_EQ(cl.link_between(0, 1).kind, LinkKind::NVLink);
  EXPECT_EQ(cl.link_between(1, 2).kind, LinkKind::PCIe);
  PlanOptions po;
  EXPECT_EQ(placement_problem(cl, {2, 1, 2, 1}, po), "");
  EXPECT_NE(placement_problem(cl, {4, 1, 1, 1}, po).find("NVLink island"), std::string::npos);
  po.tp_anywhere = true;
  EXPECT_EQ(placement_problem(cl, {4, 1, 1, 1}, po), "");
}

TEST(Topology, ClustersFromTheFixtures) {
  ClusterOptions o;
  o.gpu = "h100-sxm";
  o.topology_file = kFixtures + "h100-8gpu-nvlink.txt";
  const ClusterSpec h = build_cluster(o);
  EXPECT_EQ(h.world(), 8);
  EXPECT_TRUE(h.has_nvlink);
  EXPECT_EQ(h.largest_island(), 8);
  EXPECT_DOUBLE_EQ(h.nvlink.bandwidth, 450e9);  // 18 links x 25 GB/s
  EXPECT_EQ(placement_problem(h, {8, 1, 1, 1}, {}), "");

  o.gpu = "rtx4090";
  o.topology_file = kFixtures + "rtx4090-8gpu-pcie-nics.txt";
  const ClusterSpec r = build_cluster(o);
  EXPECT_FALSE(r.has_nvlink);
  EXPECT_EQ(r.pcie.kind, LinkKind::PCIe);
  // No NVLink at all: TP inside the node is over PCIe, which is allowed (and costed).
  EXPECT_EQ(placement_problem(r, {8, 1, 1, 1}, {}), "");
}

TEST(Topology, MalformedCapturesGetClearErrors) {
  auto error_of = [](const std::string& text) {
    try {
      Topology::parse(text, "bad.txt");
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of("hello\nworld\n").find("no matrix header"), std::string::npos);
  EXPECT_NE(error_of("\tGPU0\tGPU1\nGPU0\t X \tNV2\nGPU1\tNV2\t X \tfoo\n").find("no error"),
            std::string::npos)
      << "trailing affinity cells are fine";
  const std::string unknown = error_of("\tGPU0\tGPU1\nGPU0\t X \tNVX\nGPU1\tSYS\t X \n");
  EXPECT_NE(unknown.find("bad.txt"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("row GPU0, column GPU1"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("NVX"), std::string::npos) << unknown;
  EXPECT_NE(
      error_of("\tGPU0\tGPU1\nGPU0\t X \nGPU1\tSYS\t X \n").find("has 1 link cells, expected 2"),
      std::string::npos);
  EXPECT_NE(error_of("\tGPU0\tGPU1\nGPU0\t X \tSYS\n").find("no row for GPU1"), std::string::npos);
  EXPECT_NE(error_of("\tGPU0\tGPU1\nGPU0\tSYS\t X \nGPU1\tSYS\t X \n").find("X (self)"),
            std::string::npos);
  EXPECT_NE(error_of("\tGPU0\tGPU1\nGPU0\t X \tNV4\nGPU1\tSYS\t X \n").find("GPU1-GPU0 is SYS"),
            std::string::npos);
  EXPECT_NE(
      error_of("\tGPU0\tGPU1\nGPU0\t X \tSYS\nGPU7\tSYS\t X \n").find("not one of the header"),
      std::string::npos);
  EXPECT_THROW(Topology::from_file("/nonexistent/topo.txt"), std::runtime_error);
}

}  // namespace
}  // namespace parallm::plan
