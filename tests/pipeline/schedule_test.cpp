// Schedules as data: structure (counts, matching sends and receives, ordering), deadlock-free
// simulated execution, bubble fractions and peak in-flight micro-batches against their formulas.
#include "parallm/pipeline/schedule.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "parallm/pipeline/simulator.h"

namespace parallm::pipeline {
namespace {

int count(const Schedule& s, int stage, ActionKind k) {
  const auto& l = s.actions(stage);
  return int(std::count_if(l.begin(), l.end(), [&](const Action& a) { return a.kind == k; }));
}

TEST(Schedule, CountsAndMatchingForAllShapes) {
  for (int p = 1; p <= 5; ++p) {
    for (int m = 1; m <= 9; ++m) {
      for (const Schedule& s : {gpipe(p, m), gpipe(p, m, true), one_f_one_b(p, m)}) {
        SCOPED_TRACE(s.name());
        EXPECT_NO_THROW(validate(s));
        for (int r = 0; r < p; ++r) {
          EXPECT_EQ(count(s, r, ActionKind::Forward), m);
          EXPECT_EQ(count(s, r, ActionKind::Backward), s.forward_only ? 0 : m);
          EXPECT_EQ(count(s, r, ActionKind::RecvActivation), r == 0 ? 0 : m);
          EXPECT_EQ(count(s, r, ActionKind::SendActivation), r == p - 1 ? 0 : m);
          EXPECT_EQ(count(s, r, ActionKind::SendGrad), r == 0 || s.forward_only ? 0 : m);
          EXPECT_EQ(count(s, r, ActionKind::RecvGrad), r == p - 1 || s.forward_only ? 0 : m);
        }
        EXPECT_NO_THROW(simulate(s));
      }
    }
  }
  for (int p = 2; p <= 4; ++p) {
    for (int m = p; m <= 3 * p; m += p) {
      for (int v = 1; v <= 3; ++v) {
        const Schedule s = interleaved(p, m, v);
        SCOPED_TRACE(s.name());
        EXPECT_NO_THROW(validate(s));
        for (int r = 0; r < p; ++r) {
          EXPECT_EQ(count(s, r, ActionKind::Forward), m * v);
          EXPECT_EQ(count(s, r, ActionKind::Backward), m * v);
          // Only virtual stage 0 (stage 0, chunk 0) receives no activation.
          EXPECT_EQ(count(s, r, ActionKind::RecvActivation), r == 0 ? m * (v - 1) : m * v);
          EXPECT_EQ(count(s, r, ActionKind::SendActivation), r == p - 1 ? m * (v - 1) : m * v);
        }
        EXPECT_NO_THROW(simulate(s));
      }
    }
  }
}

TEST(Schedule, OneFOneBWarmupIsPMinusRankMinusOne) {
  const Schedule s = one_f_one_b(4, 8);
  for (int r = 0; r < 4; ++r) {
    const auto& l = s.actions(r);
    int forwards_before_first_backward = 0;
    for (const Action& a : l) {
      if (a.kind == ActionKind::Backward) break;
      if (a.kind == ActionKind::Forward) ++forwards_before_first_backward;
    }
    // Warm-up forwards plus the first steady-state forward.
    EXPECT_EQ(forwards_before_first_backward, 4 - r - 1 + 1) << "stage " << r;
  }
  // Last stage alternates strictly: F0 B0 F1 B1 ...
  const auto& last = s.actions(3);
  EXPECT_EQ(to_string(last[0]), "recvA0");
  EXPECT_EQ(to_string(last[1]), "F0");
  EXPECT_EQ(to_string(last[2]), "B0");
  EXPECT_EQ(to_string(last[3]), "sendG0");
}

TEST(Schedule, PeersFollowTheChunkGraph) {
  const Schedule s = interleaved(2, 2, 2);
  // Stage 1 chunk 0 is virtual stage 1; its output goes to virtual stage 2 = stage 0 chunk 1.
  const Peer to = s.peer(1, {ActionKind::SendActivation, 0, 0});
  EXPECT_EQ(to.stage, 0);
  EXPECT_EQ(to.chunk, 1);
  const Peer from = s.peer(0, {ActionKind::RecvActivation, 0, 1});
  EXPECT_EQ(from.stage, 1);
  EXPECT_EQ(from.chunk, 0);
  EXPECT_THROW(s.peer(0, {ActionKind::RecvActivation, 0, 0}), std::invalid_argument);
}

TEST(Simulator, BubbleMatchesFormulaForGPipeAnd1F1B) {
  for (int p = 1; p <= 6; ++p) {
    for (int m = 1; m <= 9; ++m) {
      for (double tb : {1.0, 2.0, 3.0}) {
        for (const Schedule& s : {gpipe(p, m), one_f_one_b(p, m)}) {
          SCOPED_TRACE(s.name() + " tb=" + std::to_string(tb));
          const SimResult r = simulate(s, {1.0, tb, 0.0});
          EXPECT_NEAR(r.bubble_fraction, bubble_formula(s.kind, p, m), 1e-12);
          EXPECT_NEAR(r.makespan, (m + p - 1) * (1.0 + tb), 1e-9);
        }
      }
    }
  }
}

TEST(Simulator, BubbleMatchesFormulaForInterleaved) {
  for (int p = 2; p <= 5; ++p) {
    for (int m = p; m <= 4 * p; m += p) {
      for (int v = 1; v <= 4; ++v) {
        const Schedule s = interleaved(p, m, v);
        SCOPED_TRACE(s.name());
        const SimResult r = simulate(s, {1.0, 2.0, 0.0});
        EXPECT_NEAR(r.bubble_fraction, bubble_formula(s.kind, p, m, v), 1e-9);
      }
    }
  }
  // Interleaving shrinks the bubble by v.
  const double b1 = simulate(one_f_one_b(4, 8)).bubble_fraction;
  const double b2 = simulate(interleaved(4, 8, 2)).bubble_fraction;
  EXPECT_NEAR(b1, 3.0 / 11.0, 1e-12);
  EXPECT_NEAR(b2, 3.0 / 19.0, 1e-9);
}

TEST(Simulator, PeakInFlightMatchesFormula) {
  for (int p = 2; p <= 5; ++p) {
    for (int m : {p, 2 * p, 3 * p}) {
      for (int v : {1, 2, 3}) {
        std::vector<Schedule> all = {gpipe(p, m), gpipe(p, m, true), one_f_one_b(p, m),
                                     interleaved(p, m, v)};
        for (const Schedule& s : all) {
          SCOPED_TRACE(s.name());
          const SimResult r = simulate(s);
          for (int st = 0; st < p; ++st)
            EXPECT_DOUBLE_EQ(r.peak_in_flight[st],
                             peak_in_flight_formula(s.kind, p, m, s.chunks, st, s.forward_only))
                << "stage " << st;
        }
      }
    }
  }
  // The reason 1F1B exists: stage 0 holds p micro-batches, not m.
  const SimResult g = simulate(gpipe(4, 16)), f = simulate(one_f_one_b(4, 16));
  EXPECT_EQ(g.peak_in_flight_chunks[0], 16);
  EXPECT_EQ(f.peak_in_flight_chunks[0], 4);
  EXPECT_EQ(f.peak_in_flight_chunks[3], 1);
}

TEST(Simulator, P2PTimeAddsToTheCriticalPath) {
  // Forward-only GPipe: the last micro-batch leaves stage 0 at m tf and crosses p - 1 links.
  const SimResult r = simulate(gpipe(4, 3, true), {2.0, 0.0, 0.5});
  EXPECT_NEAR(r.makespan, (3 + 4 - 1) * 2.0 + 3 * 0.5, 1e-12);
}

TEST(Simulator, DetectsDeadlock) {
  Schedule s = gpipe(2, 1);
  // Stage 0 waits for a gradient before it sends the activation that would produce it.
  s.per_stage[0] = {{ActionKind::RecvGrad, 0, 0},
                    {ActionKind::Forward, 0, 0},
                    {ActionKind::SendActivation, 0, 0},
                    {ActionKind::Backward, 0, 0}};
  try {
    simulate(s);
    FAIL() << "expected a deadlock";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("stage 0 waits at recvG0"), std::string::npos) << e.what();
  }
}

TEST(Schedule, ValidateCatchesBrokenLists) {
  Schedule s = one_f_one_b(3, 4);
  // Drop one send: its receive has nobody to match.
  auto& l = s.per_stage[0];
  l.erase(std::find(l.begin(), l.end(), Action{ActionKind::SendActivation, 2, 0}));
  EXPECT_THROW(validate(s), std::invalid_argument);
  Schedule t = gpipe(2, 2);
  t.per_stage[1].push_back({ActionKind::Forward, 0, 0});  // runs F0 twice
  EXPECT_THROW(validate(t), std::invalid_argument);
}

TEST(Schedule, BadInputGetsClearErrors) {
  EXPECT_THROW(gpipe(0, 4), std::invalid_argument);
  EXPECT_THROW(one_f_one_b(2, 0), std::invalid_argument);
  EXPECT_THROW(interleaved(1, 4, 2), std::invalid_argument);
  try {
    interleaved(4, 6, 2);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of stages"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_schedule_kind("zigzag"), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::OneFOneB, 2, 2, 2), std::invalid_argument);
  EXPECT_THROW(simulate(gpipe(2, 2), {-1.0, 1.0, 0.0}), std::invalid_argument);
}

TEST(Simulator, RendersTextAndSvg) {
  const Schedule s = one_f_one_b(3, 4);
  const SimOptions opt{1.0, 2.0, 0.0};
  const SimResult r = simulate(s, opt);
  const std::string text = render_text(s, r, 60);
  EXPECT_NE(text.find("stage 0"), std::string::npos);
  EXPECT_NE(text.find("stage 2"), std::string::npos);
  EXPECT_NE(text.find("F0"), std::string::npos);
  EXPECT_NE(text.find("b3"), std::string::npos);
  // Stage 2 starts idle (waits for the first activation).
  EXPECT_NE(text.find("stage 2  |.."), std::string::npos) << text;
  const std::string svg = render_svg(s, r, opt);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  // 3 stages x 8 compute blocks.
  size_t rects = 0;
  for (size_t at = svg.find("stroke=\"white\""); at != std::string::npos;
       at = svg.find("stroke=\"white\"", at + 1))
    ++rects;
  EXPECT_EQ(rects, 24u);
}

}  // namespace
}  // namespace parallm::pipeline
