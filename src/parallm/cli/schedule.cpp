// parallm schedule: draw a pipeline schedule (the same action lists the pipeline executor runs)
// and compare its bubble and in-flight micro-batches with the formulas.
#include "parallm/pipeline/schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <vector>

#include "parallm/cli/command.h"
#include "parallm/cli/schedule.h"
#include "parallm/core/error.h"
#include "parallm/pipeline/simulator.h"

namespace parallm::cli {
namespace {

using Options = ScheduleOptions;

// printf into a string (the formula note is printed by the CLI and sent by the playground).
template <typename... Args>
void appendf(std::string& out, const char* fmt, Args... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, args...);
  out += buf;
}

}  // namespace

ScheduleRun run_schedule(const ScheduleOptions& o) {
  using namespace pipeline;
  // Bounds: the schedule holds pp x micro-batches x chunks actions per direction and the drawing
  // `width` cells per stage; beyond these it is no picture anyone reads.
  if (o.pp < 1 || o.pp > 1024) fail("schedule", "--pp must be in 1..1024, got ", o.pp);
  if (o.micro_batches < 1 || o.micro_batches > 65536)
    fail("schedule", "--micro-batches must be in 1..65536, got ", o.micro_batches);
  if (o.chunks < 1 || o.chunks > 1024)
    fail("schedule", "--chunks must be in 1..1024, got ", o.chunks);
  if (int64_t(o.pp) * o.micro_batches * o.chunks > (int64_t(1) << 22))
    fail("schedule", "--pp ", o.pp, " x --micro-batches ", o.micro_batches, " x --chunks ",
         o.chunks, " is more than ", int64_t(1) << 22, " actions");
  if (o.width < 1 || o.width > 100000)
    fail("schedule", "--width must be in 1..100000, got ", o.width);
  // Times: finite (an infinite one makes every share inf/inf, printed "-nan%").
  if (!std::isfinite(o.forward) || !(o.forward > 0))
    fail("schedule", "--forward-time must be a positive finite number, got ", o.forward);
  if (!std::isfinite(o.backward) || o.backward < 0 || (o.backward == 0 && !o.forward_only))
    fail("schedule", "--backward-time must be a positive finite number, got ", o.backward);
  if (!std::isfinite(o.p2p) || o.p2p < 0)
    fail("schedule", "--p2p-time must be a finite number >= 0, got ", o.p2p);
  const ScheduleKind kind = parse_schedule_kind(o.schedule);
  // --weight-time: W's share of --backward-time; negative (the default) means half of it.
  if (!std::isfinite(o.weight) ||
      (o.weight > o.backward && o.stage_backward.empty() && !o.forward_only))
    fail("schedule", "--weight-time must be a finite number <= --backward-time (", o.backward,
         "), got ", o.weight);
  const std::pair<const char*, const std::vector<double>*> lists[] = {
      {"--stage-forward-times", &o.stage_forward},
      {"--stage-backward-times", &o.stage_backward},
      {"--stage-weight-times", &o.stage_weight}};
  for (const auto& [flag, v] : lists) {
    if (!v->empty() && int(v->size()) != o.pp)
      fail("schedule", flag, ": ", v->size(), " times given, expected one per stage (--pp ", o.pp,
           ")");
    for (double t : *v)
      if (!std::isfinite(t) || t < 0)
        fail("schedule", flag, ": times must be finite numbers >= 0, got ", t);
  }
  // W is part of the backward: no stage's W may be longer than that stage's whole backward.
  for (int st = 0; st < o.pp && !o.forward_only; ++st) {
    const double b = o.stage_backward.empty() ? o.backward : o.stage_backward[st];
    const double w = !o.stage_weight.empty() ? o.stage_weight[st] : o.weight;
    if (w > b)
      fail("schedule", o.stage_weight.empty() ? "--weight-time" : "--stage-weight-times",
           ": stage ", st, " W ", w, " is longer than its whole backward ", b);
  }
  const Schedule s = make_schedule(kind, o.pp, o.micro_batches, o.chunks, o.forward_only);
  validate(s);
  SimOptions opt{o.forward, o.forward_only ? 0.0 : o.backward, o.p2p,
                 o.forward_only ? 0.0 : o.weight};
  opt.stage_forward = o.stage_forward;
  opt.stage_backward = o.stage_backward;
  opt.stage_weight = o.stage_weight;
  const bool per_stage =
      !o.stage_forward.empty() || !o.stage_backward.empty() || !o.stage_weight.empty();
  ScheduleRun run;
  run.kind = kind;
  run.per_stage = per_stage;
  run.result = simulate(s, opt);
  run.formula = bubble_formula(kind, o.pp, o.micro_batches, s.chunks, opt);
  run.schedule = s;
  run.sim = opt;
  return run;
}

std::string bubble_formula_note(const ScheduleOptions& o, const ScheduleRun& run) {
  using namespace pipeline;
  const ScheduleKind kind = run.kind;
  const SimOptions& opt = run.sim;
  const double formula = run.formula;
  const bool per_stage = run.per_stage;
  std::string out;
  if (per_stage)
    appendf(out, "  (per-stage times: the formula with the scalar times is %.4f)\n", formula);
  else if (o.forward_only)
    appendf(out, "  (forward-only: formula (p-1)/(m+p-1) = %.4f)\n", formula);
  else if (kind == ScheduleKind::Interleaved)
    appendf(out, "  (formula (p-1)/(v m + p-1) = %d/%d = %.4f%s)\n", o.pp - 1,
            o.chunks * o.micro_batches + o.pp - 1, formula,
            o.p2p > 0 ? "; p2p time is not in the formula" : "");
  else if (kind == ScheduleKind::ZeroBubbleH1) {
    const double f = opt.forward_time, w = opt.weight(0), b = opt.backward_time - w;
    if (f == b && b == w && o.micro_batches >= o.pp)
      appendf(out, "  (formula with F = B = W: (p-1)/(3m+p-1) = %d/%d = %.4f%s)\n", o.pp - 1,
              3 * o.micro_batches + o.pp - 1, formula,
              o.p2p > 0 ? "; p2p time is not in the formula" : "");
    else
      appendf(out,
              "  (formula 1 - m(F+B+W)/max(m(F+B+W)+(p-1)(F+B-W), (m+p-1)(F+B)+W) = %.4f%s%s)\n",
              formula, w <= std::min(f, b) ? "" : "; W > min(F, B): formula not exact",
              o.p2p > 0 ? "; p2p time is not in the formula" : "");
    appendf(out, "(1f1b at the same p and m: (p-1)/(m+p-1) = %.4f)\n",
            bubble_formula(ScheduleKind::OneFOneB, o.pp, o.micro_batches));
  } else
    appendf(out, "  (formula (p-1)/(m+p-1) = %d/%d = %.4f%s)\n", o.pp - 1,
            o.micro_batches + o.pp - 1, formula,
            o.p2p > 0 ? "; p2p time is not in the formula" : "");
  return out;
}

namespace {

int run(const Options& o) {
  using namespace pipeline;
  const ScheduleRun sr = run_schedule(o);
  const Schedule& s = sr.schedule;
  const SimOptions& opt = sr.sim;
  const SimResult& r = sr.result;
  const ScheduleKind kind = sr.kind;
  const bool per_stage = sr.per_stage;
  std::printf("%s, forward %g, backward %g", s.name().c_str(), opt.forward_time, opt.backward_time);
  if (s.split_backward())
    std::printf(" (B %g + W %g)", opt.backward_time - opt.weight(0), opt.weight(0));
  std::printf(", p2p %g per micro-batch per stage%s\n\n", opt.p2p_time,
              per_stage ? "; per-stage times given" : "");
  std::cout << render_text(s, r, o.width);
  std::printf("\nmakespan %g; bubble fraction %.4f", r.makespan, r.bubble_fraction);
  std::fputs(bubble_formula_note(o, sr).c_str(), stdout);
  std::printf("peak micro-batches in flight per stage (activations held):\n");
  for (int st = 0; st < o.pp; ++st)
    std::printf("  stage %d: %g (formula %g)\n", st, r.peak_in_flight[st],
                peak_in_flight_formula(kind, o.pp, o.micro_batches, s.chunks, st, o.forward_only));
  if (o.list) {
    std::printf("\naction lists (what the executor runs):\n");
    for (int st = 0; st < o.pp; ++st) {
      std::printf("  stage %d:", st);
      for (const Action& a : s.actions(st)) std::printf(" %s", to_string(a).c_str());
      std::printf("\n");
    }
  }
  if (!o.svg.empty()) {
    std::ofstream out(o.svg);
    if (!out) fail<std::runtime_error>("schedule", "--svg ", o.svg, ": cannot open for writing");
    out << render_svg(s, r, opt);
    if (!out) fail<std::runtime_error>("schedule", "--svg ", o.svg, ": write failed");
    std::printf("\nwrote %s\n", o.svg.c_str());
  }
  return 0;
}

const bool registered = register_command(
    {"schedule",
     "Simulate and draw a pipeline schedule (gpipe, 1f1b, interleaved, zb-h1): bubble and "
     "in-flight micro-batches",
     [](CLI::App& app) {
       auto o = std::make_shared<Options>();
       app.add_option("--pp", o->pp, "Pipeline stages (default 4)");
       app.add_option("--micro-batches", o->micro_batches, "Micro-batches per step (default 8)");
       app.add_option("--schedule", o->schedule,
                      "gpipe, 1f1b (default), interleaved or zb-h1 (zero bubble H1: backward "
                      "split into B, input gradient, and W, weight gradient, W filling the "
                      "bubble)");
       app.add_option("--chunks", o->chunks, "Model chunks per stage (interleaved; default 1)");
       app.add_option("--forward-time", o->forward,
                      "Forward time of a micro-batch through a stage (default 1)");
       app.add_option("--backward-time", o->backward, "Whole backward time, B + W (default 2)");
       app.add_option("--weight-time", o->weight,
                      "zb-h1: W's share of the backward time (default half of it, so that the "
                      "defaults give F = B = W = 1)");
       app.add_option("--stage-forward-times", o->stage_forward,
                      "Per-stage forward times, one per stage, comma-separated (replay measured "
                      "durations; default: --forward-time on every stage)")
           ->delimiter(',');
       app.add_option("--stage-backward-times", o->stage_backward,
                      "Per-stage whole backward times (B + W), comma-separated")
           ->delimiter(',');
       app.add_option("--stage-weight-times", o->stage_weight,
                      "Per-stage W times (zb-h1), comma-separated")
           ->delimiter(',');
       app.add_option("--p2p-time", o->p2p, "Time from a send to its receive (default 0)");
       app.add_flag("--forward-only", o->forward_only, "Inference: forward passes only (gpipe)");
       app.add_option("--svg", o->svg, "Also write the timeline as SVG to this file");
       app.add_option("--width", o->width, "Characters of timeline in the terminal (default 100)");
       app.add_flag("--list", o->list, "Print each stage's action list");
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
