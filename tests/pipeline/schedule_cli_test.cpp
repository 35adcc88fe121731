// `parallm schedule` end to end: the drawing, the bubble beside its formula, the SVG, bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

std::pair<int, std::string> run(const std::string& args) {
  const std::string cmd = std::string(PARALLM_BIN) + " " + args + " 2>&1";
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, "popen failed"};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(ScheduleCli, OneFOneBPrintsBubbleBesideFormula) {
  const auto [code, out] = run("schedule --pp 4 --micro-batches 8 --schedule 1f1b --list");
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("stage 3"), std::string::npos) << out;
  EXPECT_NE(out.find("bubble fraction 0.2727"), std::string::npos) << out;  // 3/11
  EXPECT_NE(out.find("formula (p-1)/(m+p-1) = 3/11 = 0.2727"), std::string::npos) << out;
  EXPECT_NE(out.find("stage 0: 4 (formula 4)"), std::string::npos) << out;
  EXPECT_NE(out.find("stage 3: recvA0 F0 B0 sendG0"), std::string::npos) << out;
}

TEST(ScheduleCli, InterleavedAndSvg) {
  const auto svg = std::filesystem::temp_directory_path() /
                   ("parallm_sched_" + std::to_string(::getpid()) + ".svg");
  const auto [code, out] =
      run("schedule --pp 4 --micro-batches 8 --schedule interleaved --chunks 2 --forward-time 2 "
          "--backward-time 4 "
          "--svg " +
          svg.string());
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("bubble fraction 0.1579"), std::string::npos) << out;  // 3/19
  std::ifstream f(svg);
  const std::string text((std::istreambuf_iterator<char>(f)), {});
  EXPECT_EQ(text.rfind("<svg", 0), 0u);
  std::filesystem::remove(svg);
}

TEST(ScheduleCli, BadInput) {
  for (const std::string args :
       {"schedule --pp 0", "schedule --schedule zigzag",
        "schedule --pp 4 --micro-batches 6 --schedule interleaved --chunks 2",
        "schedule --schedule 1f1b --chunks 2", "schedule --forward-time -1"}) {
    const auto [code, out] = run(args);
    EXPECT_NE(code, 0) << args;
    EXPECT_NE(out.find("error"), std::string::npos) << args << ": " << out;
  }
}

}  // namespace
