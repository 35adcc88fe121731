// The schedule simulator: executes the per-stage action lists of a Schedule (schedule.h) with given
// forward, backward and point-to-point times, and reports the per-stage timelines, the bubble
// fraction and the peak number of micro-batches whose activations a stage holds. It draws the
// timelines as text (terminal) or SVG. The planner uses it for pipeline step time and activation
// memory, so that both speak of the same lists the executor runs.
#pragma once

#include <string>
#include <vector>

#include "parallm/pipeline/schedule.h"

namespace parallm::pipeline {

struct SimOptions {
  // SimOptions{forward, backward, p2p[, weight]} as before the per-stage lists came (a constructor,
  // so that brace-initialising the leading fields leaves no -Wmissing-field-initializers).
  SimOptions(double forward = 1.0, double backward = 2.0, double p2p = 0.0, double weight = -1.0)
      : forward_time(forward), backward_time(backward), p2p_time(p2p), weight_time(weight) {}

  // Times of one micro-batch through one whole stage (all its chunks together); a chunk of an
  // interleaved schedule takes 1/v of them. Any unit (the simulator does not care).
  double forward_time = 1.0;
  // The whole backward, input and weight gradients together, for every schedule, so that one set
  // of options compares schedules fairly. Split schedules (zb-h1) run it as B, taking
  // backward_time - weight_time, and W, taking weight_time.
  double backward_time = 2.0;
  double p2p_time = 0.0;  // from a Send* to the moment its Recv* can complete
  // W's share of backward_time; negative: half of it (so the defaults give F = B = W = 1).
  double weight_time = -1.0;
  // Per-stage times, to replay measured durations: each empty (use the scalar above) or one entry
  // per stage, with the scalars' meaning (stage_backward is B + W; stage_weight, if empty, is
  // weight_time, or half of the stage's backward when that is negative).
  std::vector<double> stage_forward, stage_backward, stage_weight;

  // The times stage `stage` uses (whole-stage, all chunks), after the defaults above.
  double forward(int stage) const;
  double backward(int stage) const;  // B + W
  double weight(int stage) const;    // W
};

struct Interval {
  Action action;
  double start = 0;
  double end = 0;
};

struct SimResult {
  double makespan = 0;                          // first action start to last action end
  std::vector<std::vector<Interval>> timeline;  // [stage] compute intervals (F, B, W) in order
  std::vector<double> busy;                     // [stage] compute time
  std::vector<double> idle;                     // [stage] makespan - busy: its bubble
  double bubble_fraction = 0;                   // 1 - sum(busy) / (stages * makespan)
  // [stage] most (micro-batch, chunk) activations held at once: forwards done whose backward (or,
  // split, whose W) is not. In micro-batch units (chunks / v) as well. Forward-only schedules
  // hold 1.
  std::vector<int> peak_in_flight_chunks;
  std::vector<double> peak_in_flight;
};

// Runs the lists under the semantics of schedule.h (buffered sends, blocking receives). Throws
// std::invalid_argument naming the stuck stages and their waiting actions if the lists deadlock,
// or naming the bad option (negative or non-finite time, W longer than the backward, a per-stage
// list whose size is not the stage count).
SimResult simulate(const Schedule& s, const SimOptions& opt = {});

// The closed forms the simulator is checked against (p2p time 0, any forward/backward ratio for
// GPipe/1F1B; interleaved assumes chunk times 1/v of the stage's):
//   GPipe, 1F1B: (p - 1) / (m + p - 1);  interleaved: (p - 1) / (v m + p - 1);
//   zb-h1 with F = B = W (the defaults): 1 - 3m / max(3m + p - 1, 2m + 2p - 1), which for m >= p
//   is (p - 1) / (3m + p - 1): p - 1 idle units per stage, a third of 1F1B's 3 (p - 1).
double bubble_formula(ScheduleKind kind, int p, int m, int v = 1);
// The same with opt's scalar times (per-stage lists ignored). Only zb-h1 depends on them:
// with F, B = backward - W and W, where W <= min(F, B) (else the simulator is the reference),
//   makespan = max(m (F + B + W) + (p - 1)(F + B - W), (m + p - 1)(F + B) + W),
//   bubble = 1 - m (F + B + W) / makespan.
double bubble_formula(ScheduleKind kind, int p, int m, int v, const SimOptions& opt);
double zb_h1_makespan_formula(int p, int m, double f, double b, double w);
// Peak micro-batches in flight on `stage` (micro-batch units): GPipe m; 1F1B min(p - r, m);
// interleaved (min(m v, 2 (p - r - 1) + (v - 1) p + 1)) / v (all m v when m == p); zb-h1
// min(p, m) on every stage (activations held until W).
double peak_in_flight_formula(ScheduleKind kind, int p, int m, int v, int stage,
                              bool forward_only = false);

// One line per stage, `width` characters of timeline: "F3" blocks for forwards, lower-case "b3"
// for whole backwards, "B3" and "W3" for the input and weight halves of split ones ("F3.1":
// chunk 1), '.' for idle; then the busy share and peak in flight.
std::string render_text(const Schedule& s, const SimResult& r, int width = 100);
// A standalone SVG document of the same timeline (F blue, B green, W orange).
std::string render_svg(const Schedule& s, const SimResult& r, const SimOptions& opt);

}  // namespace parallm::pipeline
