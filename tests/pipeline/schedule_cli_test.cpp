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

// Issue 17: infinite times printed "busy -nan%"; NaN slipped past the checks; huge counts sized
// the schedule without bound. Each is one line naming the flag and its value, exit 1, no signal.
TEST(ScheduleCli, NonFiniteTimesAndHugeCountsAreRefused) {
  struct Case {
    std::string args, flag, value;
  };
  const Case cases[] = {
      {"schedule --forward-time inf", "--forward-time", "got inf"},
      {"schedule --forward-time nan", "--forward-time", "got nan"},
      {"schedule --backward-time inf", "--backward-time", "got inf"},
      {"schedule --backward-time nan", "--backward-time", "got nan"},
      {"schedule --p2p-time inf", "--p2p-time", "got inf"},
      {"schedule --p2p-time nan", "--p2p-time", "got nan"},
      {"schedule --p2p-time -1", "--p2p-time", "got -1"},
      {"schedule --pp 100000", "--pp", "got 100000"},
      {"schedule --micro-batches 2000000000", "--micro-batches", "got 2000000000"},
      {"schedule --pp 1024 --micro-batches 65536", "--micro-batches 65536", "more than 4194304 actions"},
      {"schedule --width 0", "--width", "got 0"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const auto [code, out] = run(c.args);
    EXPECT_EQ(code, 1) << out;  // run() reports a signal as -1
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_NE(out.find(c.flag), std::string::npos) << out;
    EXPECT_NE(out.find(c.value), std::string::npos) << out;
    EXPECT_EQ(out.find("nan%"), std::string::npos) << out;
  }
}

}  // namespace

namespace {

// Zero bubble (issue 12): the H1 schedule beside its formula and 1F1B's, W drawn apart from B.
TEST(ScheduleCli, ZeroBubbleH1) {
  const auto [code, out] = run("schedule --pp 4 --micro-batches 8 --schedule zb-h1 --list");
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("zb-h1 p=4 m=8, forward 1, backward 2 (B 1 + W 1)"), std::string::npos)
      << out;
  EXPECT_NE(out.find("bubble fraction 0.1111"), std::string::npos) << out;  // 3/27
  EXPECT_NE(out.find("formula with F = B = W: (p-1)/(3m+p-1) = 3/27 = 0.1111"), std::string::npos)
      << out;
  EXPECT_NE(out.find("(1f1b at the same p and m: (p-1)/(m+p-1) = 0.2727)"), std::string::npos)
      << out;
  for (const char* stage : {"stage 0: 4 (formula 4)", "stage 3: 4 (formula 4)"})
    EXPECT_NE(out.find(stage), std::string::npos) << out;
  EXPECT_NE(out.find("stage 3: recvA0 F0 B0 sendG0 recvA1 F1 B1 sendG1"), std::string::npos) << out;
  EXPECT_NE(out.find("recvA7 F7 B7 sendG7 W4 W5 W6 W7"), std::string::npos) << out;
  EXPECT_NE(out.find("|W0"), std::string::npos) << out;  // the drawing names W blocks
}

TEST(ScheduleCli, ZeroBubbleWeightAndPerStageTimes) {
  {
    // F 1, B 1.5, W 0.5: the general formula, still exact since W <= min(F, B).
    const auto [code, out] = run(
        "schedule --pp 4 --micro-batches 8 --schedule zb-h1 --backward-time 2 --weight-time 0.5");
    ASSERT_EQ(code, 0) << out;
    EXPECT_NE(out.find("(B 1.5 + W 0.5)"), std::string::npos) << out;
    // makespan max(8 * 3 + 3 * 2, 11 * 2.5 + 0.5) = 30, bubble 1 - 24/30 = 0.2
    EXPECT_NE(out.find("makespan 30; bubble fraction 0.2000"), std::string::npos) << out;
    EXPECT_NE(out.find("= 0.2000)"), std::string::npos) << out;
  }
  {
    const auto [code, out] =
        run("schedule --pp 2 --micro-batches 4 --schedule zb-h1 --stage-forward-times 1,2 "
            "--stage-backward-times 2,4 --stage-weight-times 1,2");
    ASSERT_EQ(code, 0) << out;
    EXPECT_NE(out.find("per-stage times given"), std::string::npos) << out;
    // Stage 1 paces: it starts after stage 0's F0 (1) and is busy 4 x 6 = 24 without a gap.
    EXPECT_NE(out.find("makespan 25;"), std::string::npos) << out;
  }
}

TEST(ScheduleCli, ZeroBubbleBadInput) {
  struct Case {
    std::string args, needle;
  };
  const Case cases[] = {
      {"schedule --schedule zb-h1 --chunks 2", "--chunks 2"},
      {"schedule --schedule zb-h1 --weight-time 3", "--weight-time"},
      {"schedule --schedule zb-h1 --weight-time nan", "--weight-time"},
      {"schedule --pp 4 --schedule zb-h1 --stage-forward-times 1,2", "--stage-forward-times"},
      {"schedule --pp 2 --schedule zb-h1 --stage-backward-times 1,inf", "--stage-backward-times"},
      {"schedule --pp 2 --schedule zb-h1 --stage-weight-times 1,3", "--stage-weight-times"},
      {"schedule --pp 2 --schedule zb-h1 --stage-backward-times 2,4 --weight-time 3",
       "--weight-time: stage 0 W 3"},
      {"schedule --schedule zb-h2", "zb-h1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const auto [code, out] = run(c.args);
    EXPECT_EQ(code, 1) << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_NE(out.find(c.needle), std::string::npos) << out;
  }
  const auto [code, out] = run("schedule --help");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("zb-h1"), std::string::npos) << out;
  EXPECT_NE(out.find("--weight-time"), std::string::npos) << out;
  EXPECT_NE(out.find("--stage-forward-times"), std::string::npos) << out;
}

}  // namespace
