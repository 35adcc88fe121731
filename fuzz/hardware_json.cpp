// Fuzzes the planner's hardware JSON: the --hardware cluster file through build_cluster
// (plan/cluster.h) exactly as the CLI reads it -- from a path, here a memfd, so the bytes never
// touch the disk -- and the same bytes as a device (--gpu file.json), a link and a calibration
// file (plan/hardware.h).
#include <sys/mman.h>
#include <unistd.h>

#include <string>

#include "fuzz_main.h"
#include "parallm/core/json_limits.h"
#include "parallm/plan/cluster.h"
#include "parallm/plan/hardware.h"

namespace {

// One memfd for the whole run, rewritten for each input.
int hardware_fd() {
  static const int fd = memfd_create("parallm-fuzz-hardware.json", 0);
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace parallm;
  const int fd = hardware_fd();
  if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != ssize_t(size)) return 0;
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  fuzz::expect_clean([&] {
    plan::ClusterOptions o;
    o.hardware_file = path;
    const plan::ClusterSpec c = plan::build_cluster(o);
    (void)c.describe();
    (void)c.largest_island();
  });
  fuzz::expect_clean([&] {
    const auto j = parse_json_text(fuzz::as_text(data, size), "hardware", "fuzz/hardware.json");
    fuzz::expect_clean([&] { (void)plan::device_from_json(j, "fuzz/gpu.json"); });
    fuzz::expect_clean([&] { (void)plan::link_from_json(j, "fuzz/link.json"); });
    fuzz::expect_clean([&] {
      const auto cal = plan::Calibration::from_json(j, "fuzz/calibration.json");
      (void)cal.op("all_reduce");
    });
  });
  return 0;
}
