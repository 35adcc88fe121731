// Fuzzes the `nvidia-smi topo -m` parser (plan/topology.h, Topology::parse) and the queries the
// planner makes of a parsed topology (links between GPUs, NVLink islands).
#include <string>

#include "fuzz_main.h"
#include "parallm/plan/topology.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  parallm::fuzz::expect_clean([&] {
    const auto t = parallm::plan::Topology::parse(std::string(parallm::fuzz::as_text(data, size)),
                                                  "fuzz/topo.txt");
    const int n = t.num_gpus();
    for (int i = 0; i < n && i < 64; ++i)
      for (int j = 0; j < n && j < 64; ++j) {
        (void)parallm::plan::topo_link_name(t.gpu_link(i, j), t.gpu_nvlinks(i, j));
      }
    for (const auto& island : t.nvlink_islands()) {
      (void)t.fully_connected(island);
      (void)t.min_nvlinks(island);
    }
  });
  return 0;
}
