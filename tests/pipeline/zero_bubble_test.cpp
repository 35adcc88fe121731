// ZB-H1 (zero-bubble, split backward): structure, the W/B/F order that gives the short bubble, the
// simulator's W time and per-stage replay times, the closed forms, rendering and the executor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "parallm/pipeline/executor.h"
#include "parallm/pipeline/schedule.h"
#include "parallm/pipeline/simulator.h"

namespace parallm::pipeline {
namespace {

int count(const Schedule& s, int stage, ActionKind k) {
  const auto& l = s.actions(stage);
  return int(std::count_if(l.begin(), l.end(), [&](const Action& a) { return a.kind == k; }));
}

int index_of(const Schedule& s, int stage, Action a) {
  const auto& l = s.actions(stage);
  const auto it = std::find(l.begin(), l.end(), a);
  return it == l.end() ? -1 : int(it - l.begin());
}

std::string joined(const Schedule& s, int stage) {
  std::string out;
  for (const Action& a : s.actions(stage)) out += (out.empty() ? "" : " ") + to_string(a);
  return out;
}

void expect_invalid(const Schedule& s, const std::string& needle) {
  try {
    validate(s);
    ADD_FAILURE() << "validate accepted a broken " << s.name() << ", expected: " << needle;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(ZeroBubble, NamesAndDispatch) {
  EXPECT_EQ(parse_schedule_kind("zb-h1"), ScheduleKind::ZeroBubbleH1);
  EXPECT_EQ(schedule_kind_name(ScheduleKind::ZeroBubbleH1), "zb-h1");
  EXPECT_EQ(to_string(Action{ActionKind::BackwardInput, 3, 0}), "B3");
  EXPECT_EQ(to_string(Action{ActionKind::BackwardWeight, 3, 0}), "W3");
  EXPECT_EQ(action_kind_name(ActionKind::BackwardWeight), "BackwardWeight");
  EXPECT_TRUE((Action{ActionKind::BackwardWeight, 0, 0}.is_compute()));
  const Schedule s = make_schedule(ScheduleKind::ZeroBubbleH1, 4, 8);
  EXPECT_EQ(s.name(), "zb-h1 p=4 m=8");
  EXPECT_TRUE(s.split_backward());
  EXPECT_FALSE(one_f_one_b(4, 8).split_backward());
  EXPECT_EQ(s.per_stage, zb_h1(4, 8).per_stage);
  EXPECT_THROW(make_schedule(ScheduleKind::ZeroBubbleH1, 4, 8, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::ZeroBubbleH1, 4, 8, 1, true), std::invalid_argument);
  EXPECT_THROW(zb_h1(0, 4), std::invalid_argument);
  EXPECT_THROW(zb_h1(4, 0), std::invalid_argument);
  try {
    parse_schedule_kind("zb-h2");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("zb-h1"), std::string::npos) << e.what();
  }
}

TEST(ZeroBubble, ValidCountsAndNoDeadlockForAllShapes) {
  for (int p = 1; p <= 8; ++p) {
    for (int m = 1; m <= 12; ++m) {
      const Schedule s = zb_h1(p, m);
      SCOPED_TRACE(s.name());
      EXPECT_NO_THROW(validate(s));
      for (int r = 0; r < p; ++r) {
        EXPECT_EQ(count(s, r, ActionKind::Forward), m);
        EXPECT_EQ(count(s, r, ActionKind::BackwardInput), m);
        EXPECT_EQ(count(s, r, ActionKind::BackwardWeight), m);
        EXPECT_EQ(count(s, r, ActionKind::Backward), 0);
        EXPECT_EQ(count(s, r, ActionKind::RecvActivation), r == 0 ? 0 : m);
        EXPECT_EQ(count(s, r, ActionKind::SendActivation), r == p - 1 ? 0 : m);
        EXPECT_EQ(count(s, r, ActionKind::SendGrad), r == 0 ? 0 : m);
        EXPECT_EQ(count(s, r, ActionKind::RecvGrad), r == p - 1 ? 0 : m);
      }
      EXPECT_NO_THROW(simulate(s));
      EXPECT_NO_THROW(simulate(s, {1.0, 3.0, 0.25, 0.5}));
    }
  }
}

TEST(ZeroBubble, OrderIsWarmupThenFBWithWDeferredByStage) {
  const Schedule s = zb_h1(4, 8);
  // The last stage: F, B pairs, W of j right after B of j + 3, the last three W's at the end.
  EXPECT_EQ(joined(s, 3),
            "recvA0 F0 B0 sendG0 recvA1 F1 B1 sendG1 recvA2 F2 B2 sendG2 recvA3 F3 B3 sendG3 W0 "
            "recvA4 F4 B4 sendG4 W1 recvA5 F5 B5 sendG5 W2 recvA6 F6 B6 sendG6 W3 "
            "recvA7 F7 B7 sendG7 W4 W5 W6 W7");
  // Stage 0 is 1F1B with each backward as B then W at once.
  EXPECT_EQ(joined(s, 0),
            "F0 sendA0 F1 sendA1 F2 sendA2 F3 sendA3 recvG0 B0 W0 F4 sendA4 recvG1 B1 W1 "
            "F5 sendA5 recvG2 B2 W2 F6 sendA6 recvG3 B3 W3 F7 sendA7 recvG4 B4 W4 "
            "recvG5 B5 W5 recvG6 B6 W6 recvG7 B7 W7");
  for (int p = 2; p <= 8; ++p) {
    for (int m = p; m <= 12; ++m) {
      const Schedule z = zb_h1(p, m);
      for (int r = 0; r < p; ++r) {
        SCOPED_TRACE(z.name() + " stage " + std::to_string(r));
        // Warm-up like 1F1B: p - r forwards before the first B.
        int forwards = 0;
        for (const Action& a : z.actions(r)) {
          if (a.kind == ActionKind::BackwardInput) break;
          forwards += a.kind == ActionKind::Forward;
        }
        EXPECT_EQ(forwards, p - r);
        // W of j follows B of j + r (then its SendGrad, if any); the last r W's end the list.
        for (int j = 0; j + r < m; ++j) {
          const int b = index_of(z, r, {ActionKind::BackwardInput, j + r, 0});
          EXPECT_EQ(index_of(z, r, {ActionKind::BackwardWeight, j, 0}), b + (r == 0 ? 1 : 2));
        }
        const auto& l = z.actions(r);
        for (int k = 0; k < r; ++k)
          EXPECT_EQ(l[l.size() - r + k], (Action{ActionKind::BackwardWeight, m - r + k, 0}));
      }
    }
  }
}

TEST(ZeroBubble, BubbleIsAThirdOf1F1BsAtEqualTimes) {
  // Defaults: forward 1, backward 2 split in B 1 + W 1.
  const SimResult z = simulate(zb_h1(4, 8)), o = simulate(one_f_one_b(4, 8));
  EXPECT_DOUBLE_EQ(z.makespan, 3 * 8 + 4 - 1);
  EXPECT_DOUBLE_EQ(o.makespan, 3 * (8 + 4 - 1));
  EXPECT_NEAR(z.bubble_fraction, 3.0 / 27.0, 1e-12);
  EXPECT_NEAR(o.bubble_fraction, 3.0 / 11.0, 1e-12);
  EXPECT_NEAR(bubble_formula(ScheduleKind::ZeroBubbleH1, 4, 8), 3.0 / 27.0, 1e-12);
  for (int st = 0; st < 4; ++st) {
    // The idle time itself is exactly a third: p - 1 units against 3 (p - 1).
    EXPECT_DOUBLE_EQ(z.idle[st], 3.0) << st;
    EXPECT_DOUBLE_EQ(o.idle[st], 9.0) << st;
    EXPECT_DOUBLE_EQ(z.busy[st], o.busy[st]) << st;
  }
  // Same peak memory as 1F1B's largest stage.
  EXPECT_EQ(*std::max_element(z.peak_in_flight_chunks.begin(), z.peak_in_flight_chunks.end()),
            *std::max_element(o.peak_in_flight_chunks.begin(), o.peak_in_flight_chunks.end()));
}

TEST(ZeroBubble, BubbleMatchesFormulaAtEqualTimes) {
  for (int p = 1; p <= 8; ++p) {
    for (int m = 1; m <= 16; ++m) {
      const SimResult r = simulate(zb_h1(p, m), {1.0, 2.0, 0.0});
      SCOPED_TRACE("p=" + std::to_string(p) + " m=" + std::to_string(m));
      EXPECT_NEAR(r.makespan, std::max(3 * m + p - 1, 2 * m + 2 * p - 1), 1e-12);
      EXPECT_NEAR(r.bubble_fraction, bubble_formula(ScheduleKind::ZeroBubbleH1, p, m), 1e-12);
      if (m >= p) {
        EXPECT_NEAR(r.bubble_fraction, double(p - 1) / (3 * m + p - 1), 1e-12);
      }
    }
  }
}

TEST(ZeroBubble, MakespanMatchesFormulaForUnequalTimes) {
  // Exact whenever W <= min(F, B).
  const double times[][3] = {{1, 1, 1},   {1, 2, 1},      {1, 1, 0.5},   {2, 1, 1},
                             {1, 3, 0.5}, {1.5, 1, 0.25}, {0.5, 2, 0.5}, {1, 1, 0}};
  for (const auto& t : times) {
    const double f = t[0], b = t[1], w = t[2];
    for (int p = 1; p <= 8; ++p) {
      for (int m = 1; m <= 12; ++m) {
        SCOPED_TRACE(std::to_string(f) + "," + std::to_string(b) + "," + std::to_string(w) +
                     " p=" + std::to_string(p) + " m=" + std::to_string(m));
        const SimOptions opt{f, b + w, 0.0, w};
        const SimResult r = simulate(zb_h1(p, m), opt);
        EXPECT_NEAR(r.makespan, zb_h1_makespan_formula(p, m, f, b, w), 1e-9);
        EXPECT_NEAR(r.bubble_fraction, bubble_formula(ScheduleKind::ZeroBubbleH1, p, m, 1, opt),
                    1e-9);
      }
    }
  }
  // The other schedules' formulas ignore the times.
  EXPECT_DOUBLE_EQ(bubble_formula(ScheduleKind::OneFOneB, 4, 8, 1, {1.0, 5.0, 0.0, 1.0}),
                   3.0 / 11.0);
}

TEST(ZeroBubble, PeakInFlightIsMinPMOnEveryStage) {
  for (int p = 1; p <= 8; ++p) {
    for (int m = 1; m <= 12; ++m) {
      const Schedule s = zb_h1(p, m);
      for (const SimOptions& opt : {SimOptions{}, SimOptions{1.0, 3.0, 0.5, 0.5}}) {
        const SimResult r = simulate(s, opt);
        for (int st = 0; st < p; ++st) {
          EXPECT_EQ(r.peak_in_flight_chunks[st], std::min(p, m)) << s.name() << " stage " << st;
          EXPECT_DOUBLE_EQ(r.peak_in_flight[st],
                           peak_in_flight_formula(ScheduleKind::ZeroBubbleH1, p, m, 1, st));
        }
      }
    }
  }
  // Held until W, not until B: with W's held back the last stage of p = 4 holds 4, not 1F1B's 1.
  EXPECT_EQ(simulate(zb_h1(4, 8)).peak_in_flight_chunks[3], 4);
  EXPECT_EQ(simulate(one_f_one_b(4, 8)).peak_in_flight_chunks[3], 1);
}

TEST(ZeroBubble, ValidateCatchesBrokenSplitLists) {
  {
    Schedule s = zb_h1(3, 4);
    auto& l = s.per_stage[1];
    // W0 moved before its B0.
    l.erase(l.begin() + index_of(s, 1, {ActionKind::BackwardWeight, 0, 0}));
    l.insert(l.begin() + index_of(s, 1, {ActionKind::BackwardInput, 0, 0}),
             {ActionKind::BackwardWeight, 0, 0});
    expect_invalid(s, "runs W0 before B0");
  }
  {
    Schedule s = zb_h1(3, 4);
    auto& l = s.per_stage[2];
    l.erase(l.begin() + index_of(s, 2, {ActionKind::BackwardWeight, 3, 0}));
    expect_invalid(s, "never runs W3");
  }
  {
    Schedule s = zb_h1(3, 4);
    auto& l = s.per_stage[2];
    // A W between B2 and its send puts W on the critical path.
    const int w = index_of(s, 2, {ActionKind::BackwardWeight, 0, 0});
    std::swap(l[w], l[w - 1]);  // ... B2 W0 sendG2 ...
    expect_invalid(s, "right after it");
  }
  {
    Schedule s = zb_h1(2, 2);
    auto& l = s.per_stage[0];
    *std::find(l.begin(), l.end(), Action{ActionKind::BackwardInput, 1, 0}) =
        Action{ActionKind::Backward, 1, 0};
    expect_invalid(s, "whole Backward in a split-backward schedule");
  }
  {
    Schedule s = one_f_one_b(2, 2);
    s.per_stage[1].push_back({ActionKind::BackwardWeight, 0, 0});
    expect_invalid(s, "split BackwardInput/BackwardWeight in a whole-backward schedule");
  }
  {
    Schedule s = zb_h1(2, 3);
    s.per_stage[0].push_back({ActionKind::BackwardWeight, 1, 0});
    expect_invalid(s, "runs W1 twice");
  }
}

TEST(ZeroBubble, WeightTimeDefaultsToHalfTheBackward) {
  const Schedule s = zb_h1(3, 6);
  const SimResult half = simulate(s, {1.0, 3.0, 0.0});
  const SimResult explicit_half = simulate(s, {1.0, 3.0, 0.0, 1.5});
  EXPECT_DOUBLE_EQ(half.makespan, explicit_half.makespan);
  // B and W durations on the timeline.
  for (const Interval& iv : half.timeline[1]) {
    if (iv.action.kind == ActionKind::BackwardInput) {
      EXPECT_DOUBLE_EQ(iv.end - iv.start, 1.5);
    }
    if (iv.action.kind == ActionKind::BackwardWeight) {
      EXPECT_DOUBLE_EQ(iv.end - iv.start, 1.5);
    }
  }
  const SimResult w = simulate(s, {1.0, 3.0, 0.0, 0.5});
  for (const Interval& iv : w.timeline[1]) {
    if (iv.action.kind == ActionKind::BackwardInput) {
      EXPECT_DOUBLE_EQ(iv.end - iv.start, 2.5);
    }
    if (iv.action.kind == ActionKind::BackwardWeight) {
      EXPECT_DOUBLE_EQ(iv.end - iv.start, 0.5);
    }
  }
  // Whole-backward schedules ignore the split: same 1F1B result whatever W is.
  EXPECT_DOUBLE_EQ(simulate(one_f_one_b(3, 6), {1.0, 3.0, 0.0, 0.5}).makespan,
                   simulate(one_f_one_b(3, 6), {1.0, 3.0, 0.0}).makespan);
  SimOptions bad{1.0, 2.0, 0.0, 2.5};
  EXPECT_THROW(simulate(s, bad), std::invalid_argument);  // W longer than B + W
  bad.weight_time = std::nan("");
  EXPECT_THROW(simulate(s, bad), std::invalid_argument);
}

TEST(ZeroBubble, ReplaysPerStageTimes) {
  const Schedule s = zb_h1(4, 8);
  // Per-stage lists equal to the scalars change nothing.
  SimOptions same{1.0, 2.0, 0.0, 1.0};
  same.stage_forward = {1, 1, 1, 1};
  same.stage_backward = {2, 2, 2, 2};
  same.stage_weight = {1, 1, 1, 1};
  const SimResult a = simulate(s, same), b = simulate(s, {1.0, 2.0, 0.0, 1.0});
  EXPECT_DOUBLE_EQ(a.makespan, b.makespan);
  EXPECT_DOUBLE_EQ(a.bubble_fraction, b.bubble_fraction);
  // Measured durations: stage 2 slower; each stage's busy time is its own m (F + B + W).
  SimOptions measured;
  measured.stage_forward = {1.0, 1.1, 1.5, 0.9};
  measured.stage_backward = {2.0, 2.2, 3.0, 1.8};
  measured.stage_weight = {0.9, 1.0, 1.4, 0.8};
  const SimResult r = simulate(s, measured);
  for (int st = 0; st < 4; ++st) {
    EXPECT_NEAR(r.busy[st], 8 * (measured.stage_forward[st] + measured.stage_backward[st]), 1e-9);
    EXPECT_NEAR(r.idle[st], r.makespan - r.busy[st], 1e-12);
    for (const Interval& iv : r.timeline[st])
      if (iv.action.kind == ActionKind::BackwardInput) {
        EXPECT_NEAR(iv.end - iv.start, measured.stage_backward[st] - measured.stage_weight[st],
                    1e-12);
      }
  }
  // The slowest stage sets the pace: at least m of its (F + B + W).
  EXPECT_GE(r.makespan, 8 * 4.5);
  EXPECT_GT(r.makespan, b.makespan);
  // Without stage_weight, W is half of each stage's own backward.
  SimOptions no_w;
  no_w.stage_backward = {2.0, 4.0, 2.0, 2.0};
  EXPECT_DOUBLE_EQ(no_w.weight(1), 2.0);
  EXPECT_DOUBLE_EQ(no_w.weight(0), 1.0);
  // The same lists drive whole-backward schedules too (B + W as one backward).
  const SimResult o = simulate(one_f_one_b(4, 8), measured);
  for (int st = 0; st < 4; ++st) EXPECT_NEAR(o.busy[st], r.busy[st], 1e-9);
  // A list of the wrong size, a negative entry, or W longer than the stage's backward.
  SimOptions wrong;
  wrong.stage_forward = {1, 1, 1};
  EXPECT_THROW(simulate(s, wrong), std::invalid_argument);
  wrong.stage_forward = {1, 1, -1, 1};
  EXPECT_THROW(simulate(s, wrong), std::invalid_argument);
  wrong.stage_forward = {};
  wrong.stage_weight = {1, 1, 3, 1};
  try {
    simulate(s, wrong);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("stage 2"), std::string::npos) << e.what();
  }
}

TEST(ZeroBubble, RendersBAndWDistinctly) {
  const Schedule s = zb_h1(3, 4);
  const SimOptions opt;
  const SimResult r = simulate(s, opt);
  const std::string text = render_text(s, r, 120);
  EXPECT_NE(text.find("B0"), std::string::npos) << text;
  EXPECT_NE(text.find("W0"), std::string::npos) << text;
  EXPECT_NE(text.find('~'), std::string::npos) << text;   // W's fill
  EXPECT_EQ(text.find("b0"), std::string::npos) << text;  // no whole backwards
  const std::string svg = render_svg(s, r, opt);
  auto occurrences = [&](const std::string& needle) {
    size_t n = 0;
    for (size_t at = svg.find(needle); at != std::string::npos; at = svg.find(needle, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(occurrences("stroke=\"white\""), 3u * 4 * 3);  // F, B and W blocks
  EXPECT_EQ(occurrences("fill=\"#e07b10\""), 3u * 4);      // the W's in orange
  EXPECT_NE(svg.find("weight gradient W"), std::string::npos);
}

TEST(ZeroBubble, ExecutorDispatchesSplitBackwards) {
  const Schedule s = zb_h1(2, 3);
  for (int st = 0; st < 2; ++st) {
    std::vector<std::string> ran;
    auto log = [&ran](const char* what) {
      return [&ran, what](int mb, int chunk) { ran.push_back(what + std::to_string(mb)); };
    };
    StageCallbacks cb;
    cb.forward = log("F");
    cb.backward_input = log("B");
    cb.backward_weight = log("W");
    cb.send_activation = log("sendA");
    cb.recv_activation = log("recvA");
    cb.send_grad = log("sendG");
    cb.recv_grad = log("recvG");
    execute_stage(s, st, cb);
    std::vector<std::string> expected;
    for (const Action& a : s.actions(st)) expected.push_back(to_string(a));
    EXPECT_EQ(ran, expected) << "stage " << st;
    // A caller that only knows whole backwards cannot run it.
    cb.backward_weight = nullptr;
    cb.backward = log("b");
    try {
      execute_stage(s, st, cb);
      FAIL();
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("no handler for action W0"), std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace parallm::pipeline
