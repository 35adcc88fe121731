#include "parallm/pipeline/simulator.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>
#include <tuple>

#include "parallm/core/error.h"

namespace parallm::pipeline {
namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string label(const Action& a, int chunks) {
  const char* prefix = a.kind == ActionKind::Forward         ? "F"
                       : a.kind == ActionKind::BackwardInput  ? "B"
                       : a.kind == ActionKind::BackwardWeight ? "W"
                                                              : "b";
  std::string s = prefix + std::to_string(a.micro_batch);
  if (chunks > 1) s += "." + std::to_string(a.chunk);
  return s;
}

double pick(const std::vector<double>& per_stage, int stage, double scalar) {
  return per_stage.empty() ? scalar : per_stage.at(stage);
}

// Finite as well: an infinite time makes every fraction inf/inf (a "-nan%" busy share).
bool ok_time(double t) { return std::isfinite(t) && t >= 0; }

void check_options(const SimOptions& opt, int stages) {
  if (!ok_time(opt.forward_time) || !ok_time(opt.backward_time) || !ok_time(opt.p2p_time))
    fail("simulator", "times must be finite and non-negative (forward ", opt.forward_time,
         ", backward ", opt.backward_time, ", p2p ", opt.p2p_time, ")");
  if (!std::isfinite(opt.weight_time))
    fail("simulator", "weight time must be finite, got ", opt.weight_time);
  const std::pair<const char*, const std::vector<double>*> lists[] = {
      {"stage_forward", &opt.stage_forward},
      {"stage_backward", &opt.stage_backward},
      {"stage_weight", &opt.stage_weight}};
  for (const auto& [what, v] : lists) {
    if (!v->empty() && int(v->size()) != stages)
      fail("simulator", what, " has ", v->size(), " times, expected one per stage (", stages, ")");
    for (size_t i = 0; i < v->size(); ++i)
      if (!ok_time((*v)[i]))
        fail("simulator", what, "[", i, "] must be finite and non-negative, got ", (*v)[i]);
  }
  for (int st = 0; st < stages; ++st)
    if (opt.weight(st) > opt.backward(st))
      fail("simulator", "stage ", st, ": weight time ", opt.weight(st),
           " is longer than the whole backward ", opt.backward(st), " (backward is B + W)");
}

}  // namespace

double SimOptions::forward(int stage) const { return pick(stage_forward, stage, forward_time); }
double SimOptions::backward(int stage) const { return pick(stage_backward, stage, backward_time); }
double SimOptions::weight(int stage) const {
  if (!stage_weight.empty()) return stage_weight.at(stage);
  return weight_time >= 0 ? weight_time : backward(stage) / 2;
}

SimResult simulate(const Schedule& s, const SimOptions& opt) {
  const int p = s.stages;
  check_options(opt, p);
  // Per-stage durations of one chunk's F, whole backward, B and W.
  std::vector<double> tf(p), tb(p), tbi(p), tw(p);
  for (int st = 0; st < p; ++st) {
    tf[st] = opt.forward(st) / s.chunks;
    tb[st] = opt.backward(st) / s.chunks;
    tw[st] = opt.weight(st) / s.chunks;
    tbi[st] = tb[st] - tw[st];
  }
  SimResult r;
  r.timeline.resize(p);
  r.busy.assign(p, 0.0);
  r.peak_in_flight_chunks.assign(p, 0);
  std::vector<double> clock(p, 0.0);
  std::vector<size_t> next(p, 0);
  std::vector<int> held(p, 0);
  // (is_grad, micro-batch, sending virtual stage) -> arrival time
  std::map<std::tuple<bool, int, int>, double> arrived;
  size_t remaining = 0;
  for (const auto& l : s.per_stage) remaining += l.size();

  while (remaining > 0) {
    bool progress = false;
    for (int st = 0; st < p; ++st) {
      const auto& list = s.per_stage[st];
      while (next[st] < list.size()) {
        const Action& a = list[next[st]];
        if (a.is_recv()) {
          const Peer peer = s.peer(st, a);
          const bool grad = a.kind == ActionKind::RecvGrad;
          auto it = arrived.find({grad, a.micro_batch, s.virtual_stage(peer.stage, peer.chunk)});
          if (it == arrived.end()) break;  // blocked until the sender gets there
          clock[st] = std::max(clock[st], it->second);
          arrived.erase(it);
        } else if (a.is_send()) {
          arrived[{a.kind == ActionKind::SendGrad, a.micro_batch, s.virtual_stage(st, a.chunk)}] =
              clock[st] + opt.p2p_time;
        } else {
          double d = 0;
          switch (a.kind) {
            case ActionKind::Forward:
              d = tf[st];
              break;
            case ActionKind::BackwardInput:
              d = tbi[st];
              break;
            case ActionKind::BackwardWeight:
              d = tw[st];
              break;
            default:
              d = tb[st];
              break;
          }
          r.timeline[st].push_back({a, clock[st], clock[st] + d});
          clock[st] += d;
          r.busy[st] += d;
          if (a.kind == ActionKind::Forward) {
            ++held[st];
            r.peak_in_flight_chunks[st] = std::max(r.peak_in_flight_chunks[st], held[st]);
            if (s.forward_only) held[st] = 0;  // inference keeps no activations for a backward
          } else if (a.kind != ActionKind::BackwardInput) {
            --held[st];  // a whole backward or W frees them; B does not (W needs the inputs)
          }
        }
        ++next[st];
        --remaining;
        progress = true;
      }
    }
    if (!progress) {
      std::ostringstream waits;
      for (int st = 0; st < p; ++st)
        if (next[st] < s.per_stage[st].size())
          waits << " stage " << st << " waits at " << to_string(s.per_stage[st][next[st]]) << ";";
      fail("simulator", s.name(), ": deadlock:", waits.str());
    }
  }
  r.makespan = *std::max_element(clock.begin(), clock.end());
  double busy = 0;
  for (double b : r.busy) busy += b;
  r.bubble_fraction = r.makespan > 0 ? 1.0 - busy / (p * r.makespan) : 0.0;
  for (double b : r.busy) r.idle.push_back(r.makespan - b);
  for (int c : r.peak_in_flight_chunks) r.peak_in_flight.push_back(double(c) / s.chunks);
  return r;
}

double zb_h1_makespan_formula(int p, int m, double f, double b, double w) {
  // Many micro-batches: every stage busy m (F + B + W) after a start-up of p - 1 steps of
  // F + B - W (the W's that 1F1B would spend waiting run in the drain instead). Few: the last
  // stage alternates F and B (no warm-up), so its last B ends after (p - 1) F + m (F + B), then
  // the gradient crosses p - 1 B's and stage 0 ends with one W.
  return std::max(m * (f + b + w) + (p - 1) * (f + b - w), (m + p - 1) * (f + b) + w);
}

double bubble_formula(ScheduleKind kind, int p, int m, int v) {
  return bubble_formula(kind, p, m, v, SimOptions{});
}

double bubble_formula(ScheduleKind kind, int p, int m, int v, const SimOptions& opt) {
  switch (kind) {
    case ScheduleKind::Interleaved:
      return double(p - 1) / (double(v) * m + p - 1);
    case ScheduleKind::ZeroBubbleH1: {
      const double f = opt.forward_time, w = opt.weight(0);
      const double b = opt.backward_time - w;
      const double span = zb_h1_makespan_formula(p, m, f, b, w);
      return span > 0 ? 1.0 - m * (f + b + w) / span : 0.0;
    }
    default:
      return double(p - 1) / double(m + p - 1);
  }
}

double peak_in_flight_formula(ScheduleKind kind, int p, int m, int v, int stage,
                              bool forward_only) {
  if (forward_only) return 1.0;
  switch (kind) {
    case ScheduleKind::GPipe:
      return m;
    case ScheduleKind::OneFOneB:
      return std::min(p - stage, m);
    case ScheduleKind::Interleaved: {
      const int total = m * v;
      const int chunks = m == p ? total : std::min(total, 2 * (p - stage - 1) + (v - 1) * p + 1);
      return double(chunks) / v;
    }
    case ScheduleKind::ZeroBubbleH1:
      return std::min(p, m);
  }
  return 0;
}

std::string render_text(const Schedule& s, const SimResult& r, int width) {
  std::ostringstream out;
  width = std::max(width, 10);
  const double scale = r.makespan > 0 ? width / r.makespan : 0;
  for (int st = 0; st < s.stages; ++st) {
    std::string line(width, '.');
    for (const Interval& iv : r.timeline[st]) {
      const int a = std::clamp(int(std::lround(iv.start * scale)), 0, width);
      const int b = std::clamp(int(std::lround(iv.end * scale)), a, width);
      if (b == a) continue;
      std::string text = label(iv.action, s.chunks);
      const char fill = iv.action.kind == ActionKind::Forward          ? '='
                        : iv.action.kind == ActionKind::BackwardWeight ? '~'
                                                                       : '-';
      for (int i = a; i < b; ++i) {
        const int k = i - a;
        // Leave the last cell of a block as a separator when there is room for one.
        if (b - a > 1 && i == b - 1)
          line[i] = '|';
        else
          line[i] = k < int(text.size()) ? text[k] : fill;
      }
    }
    out << "stage " << st << (st < 10 ? "  " : " ") << '|' << line << "|  busy "
        << fmt("%.1f%%", r.makespan > 0 ? 100.0 * r.busy[st] / r.makespan : 0.0)
        << ", peak in flight " << fmt("%g", r.peak_in_flight[st]) << "\n";
  }
  return out.str();
}

std::string render_svg(const Schedule& s, const SimResult& r, const SimOptions& opt) {
  const double left = 70, top = 40, row = 28, width = 1000;
  const double scale = r.makespan > 0 ? width / r.makespan : 0;
  const double height = top + row * s.stages + 50;
  std::ostringstream out;
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << left + width + 20 << "\" height=\""
      << height << "\" font-family=\"monospace\" font-size=\"11\">\n";
  out << "<text x=\"" << left << "\" y=\"20\" font-size=\"14\">" << s.name() << ": bubble "
      << fmt("%.2f%%", 100 * r.bubble_fraction) << " (formula "
      << fmt("%.2f%%", 100 * bubble_formula(s.kind, s.stages, s.micro_batches, s.chunks, opt))
      << "), forward " << opt.forward_time << ", backward " << opt.backward_time;
  if (s.split_backward()) out << " (W " << opt.weight(0) << ")";
  out << ", p2p " << opt.p2p_time;
  if (!opt.stage_forward.empty() || !opt.stage_backward.empty() || !opt.stage_weight.empty())
    out << ", per-stage times given";
  out << "</text>\n";
  for (int st = 0; st < s.stages; ++st) {
    const double y = top + st * row;
    out << "<text x=\"5\" y=\"" << y + row * 0.6 << "\">stage " << st << "</text>\n";
    out << "<rect x=\"" << left << "\" y=\"" << y << "\" width=\"" << width << "\" height=\""
        << row - 4 << "\" fill=\"#eeeeee\"/>\n";
    for (const Interval& iv : r.timeline[st]) {
      const bool odd = iv.action.chunk % 2;
      // Chunks alternate shades so that interleaved schedules stay readable.
      const char* color = iv.action.kind == ActionKind::Forward ? (odd ? "#7fb3e6" : "#2f7fd0")
                          : iv.action.kind == ActionKind::BackwardWeight
                              ? (odd ? "#f2b872" : "#e07b10")
                              : (odd ? "#9ed99e" : "#3aa33a");
      const double x = left + iv.start * scale, w = (iv.end - iv.start) * scale;
      out << "<rect x=\"" << x << "\" y=\"" << y << "\" width=\"" << w << "\" height=\"" << row - 4
          << "\" fill=\"" << color << "\" stroke=\"white\"/>\n";
      if (w >= 14)
        out << "<text x=\"" << x + 2 << "\" y=\"" << y + row * 0.6 << "\" fill=\"white\">"
            << label(iv.action, s.chunks) << "</text>\n";
    }
  }
  out << "<text x=\"" << left << "\" y=\"" << top + row * s.stages + 20
      << "\">blue: forward, green: backward"
      << (s.split_backward() ? " (input gradient B), orange: weight gradient W" : "")
      << ", grey: idle (bubble); time runs left to right, makespan " << r.makespan
      << "</text>\n</svg>\n";
  return out.str();
}

}  // namespace parallm::pipeline
