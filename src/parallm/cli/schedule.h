// `parallm schedule`'s work as functions, so that `parallm playground`'s /api/schedule answers with
// the very numbers the command prints: the flags' checks, the simulation, and the formula note.
#pragma once

#include <string>
#include <vector>

#include "parallm/pipeline/schedule.h"
#include "parallm/pipeline/simulator.h"

namespace parallm::cli {

struct ScheduleOptions {
  int pp = 4, micro_batches = 8, chunks = 1, width = 100;
  std::string schedule = "1f1b";
  double forward = 1.0, backward = 2.0, p2p = 0.0, weight = -1.0;
  std::vector<double> stage_forward, stage_backward, stage_weight;
  bool forward_only = false, list = false;
  std::string svg;
};

struct ScheduleRun {
  pipeline::ScheduleKind kind = pipeline::ScheduleKind::OneFOneB;
  pipeline::Schedule schedule;
  pipeline::SimOptions sim;
  pipeline::SimResult result;
  bool per_stage = false;  // per-stage times were given
  double formula = 0;      // the closed-form bubble fraction with the scalar times
};

// Checks the options (std::invalid_argument naming the flag and value), builds the schedule and
// simulates it.
ScheduleRun run_schedule(const ScheduleOptions& o);
// What `parallm schedule` prints after "bubble fraction X": the formula it is checked against,
// "  (formula (p-1)/(m+p-1) = 3/11 = 0.2727)\n" and the like (zb-h1: two lines).
std::string bubble_formula_note(const ScheduleOptions& o, const ScheduleRun& r);

}  // namespace parallm::cli
