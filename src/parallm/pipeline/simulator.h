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
  // Times of one micro-batch through one whole stage (all its chunks together); a chunk of an
  // interleaved schedule takes 1/v of them. Any unit (the simulator does not care).
  double forward_time = 1.0;
  double backward_time = 2.0;
  double p2p_time = 0.0;  // from a Send* to the moment its Recv* can complete
};

struct Interval {
  Action action;
  double start = 0;
  double end = 0;
};

struct SimResult {
  double makespan = 0;                          // first action start to last action end
  std::vector<std::vector<Interval>> timeline;  // [stage] Forward/Backward intervals in order
  std::vector<double> busy;                     // [stage] compute time
  double bubble_fraction = 0;                   // 1 - sum(busy) / (stages * makespan)
  // [stage] most (micro-batch, chunk) activations held at once: forwards done whose backward is
  // not. In micro-batch units (chunks / v) as well. Forward-only schedules hold 1.
  std::vector<int> peak_in_flight_chunks;
  std::vector<double> peak_in_flight;
};

// Runs the lists under the semantics of schedule.h (buffered sends, blocking receives). Throws
// std::invalid_argument naming the stuck stages and their waiting actions if the lists deadlock.
SimResult simulate(const Schedule& s, const SimOptions& opt = {});

// The closed forms the simulator is checked against (p2p time 0, any forward/backward ratio for
// GPipe/1F1B; interleaved assumes chunk times 1/v of the stage's):
//   GPipe, 1F1B: (p - 1) / (m + p - 1);  interleaved: (p - 1) / (v m + p - 1).
double bubble_formula(ScheduleKind kind, int p, int m, int v = 1);
// Peak micro-batches in flight on `stage` (micro-batch units): GPipe m; 1F1B min(p - r, m);
// interleaved (min(m v, 2 (p - r - 1) + (v - 1) p + 1)) / v (all m v when m == p).
double peak_in_flight_formula(ScheduleKind kind, int p, int m, int v, int stage,
                              bool forward_only = false);

// One line per stage, `width` characters of timeline: "F3" blocks for forwards, lower-case "b3"
// for backwards ("F3.1": chunk 1), '.' for idle; then the bubble and in-flight summary.
std::string render_text(const Schedule& s, const SimResult& r, int width = 100);
// A standalone SVG document of the same timeline.
std::string render_svg(const Schedule& s, const SimResult& r, const SimOptions& opt);

}  // namespace parallm::pipeline
