#include "parallm/plan/comm_model.h"

#include <algorithm>
#include <cmath>

#include "parallm/core/error.h"

namespace parallm::plan {
namespace {

// Steps of recursive doubling: log2 p, plus a fold-in and a fold-out step when p is not a power
// of two.
int rd_steps(int p) {
  int steps = 0;
  while ((1 << steps) < p) ++steps;
  return (1 << steps) == p ? steps : steps - 1 + 2;
}

CommCost analytic(Collective c, double n, int p, double alpha, double beta) {
  const double frac = double(p - 1) / p;
  switch (c) {
    case Collective::AllReduce: {
      const double ring = 2 * (p - 1) * alpha + 2 * frac * n / beta;
      const double rd = rd_steps(p) * (alpha + n / beta);
      if (rd < ring) return {rd, rd_steps(p) * n, "recursive-doubling"};
      return {ring, 2 * frac * n, "ring"};
    }
    case Collective::AllGather:
    case Collective::ReduceScatter: {
      const double ring = (p - 1) * alpha + frac * n / beta;
      const double rd = rd_steps(p) * alpha + frac * n / beta;
      if (rd < ring) return {rd, frac * n, "recursive-doubling"};
      return {ring, frac * n, "ring"};
    }
    case Collective::AllToAll:
      return {(p - 1) * alpha + frac * n / beta, frac * n, "pairwise"};
    case Collective::P2P:
      return {alpha + n / beta, n, "p2p"};
  }
  return {};
}

// What the calibration's token bucket lets a message skip after `idle` seconds (seconds at beta).
double burst_saving(const Calibration& cal, double beta, double bytes, double idle) {
  if (!(cal.burst_bytes > 0) || !(beta > 0) || !(idle > 0)) return 0;
  return std::min({cal.burst_bytes, idle * beta, bytes}) / beta;
}

}  // namespace

std::string_view collective_name(Collective c) {
  switch (c) {
    case Collective::AllReduce:
      return "all_reduce";
    case Collective::AllGather:
      return "all_gather";
    case Collective::ReduceScatter:
      return "reduce_scatter";
    case Collective::AllToAll:
      return "all_to_all";
    case Collective::P2P:
      return "sendrecv";
  }
  return "?";
}

CommCost collective_cost(Collective c, double bytes, int p, const LinkSpec& link,
                         const Calibration* cal, double idle_before) {
  if (bytes < 0) fail("plan", "collective ", collective_name(c), " of negative size ", bytes);
  if (c == Collective::P2P) p = 2;
  if (p <= 1) return {0, 0, "none"};
  if (cal) {
    if (const AlphaBeta* m = cal->op(collective_name(c))) {
      // Measured at world w: alpha_c + n / beta_c. Other sizes scale like a ring: the step count
      // (p-1) and the volume factor (p-1)/p relative to the measured ones.
      const int w = c == Collective::P2P ? 2 : cal->world;
      const double steps = double(p - 1) / double(w - 1);
      const double volume = (double(p - 1) / p) / (double(w - 1) / w);
      const double frac = double(p - 1) / p;
      double sent = frac * bytes;
      if (c == Collective::AllReduce) sent = 2 * frac * bytes;
      if (c == Collective::P2P) sent = bytes;
      const double skew = c == Collective::P2P ? 0 : cal->arrival_skew;
      return {m->alpha * steps + bytes * volume / m->beta + skew -
                  burst_saving(*cal, m->beta, bytes, idle_before),
              sent, skew > 0 ? "calibrated + arrival skew" : "calibrated"};
    }
    if (const AlphaBeta* m = cal->op("sendrecv")) {
      // No measurement of this collective: build it from the measured point-to-point link.
      CommCost cost = analytic(c, bytes, p, m->alpha, m->beta);
      cost.seconds -= burst_saving(*cal, m->beta, bytes, idle_before);
      cost.algorithm += " (from calibrated sendrecv)";
      if (c != Collective::P2P && cal->arrival_skew > 0) {
        cost.seconds += cal->arrival_skew;
        cost.algorithm += " + arrival skew";
      }
      return cost;
    }
  }
  if (!(link.bandwidth > 0)) fail("plan", "link \"", link.name, "\" has no bandwidth");
  return analytic(c, bytes, p, link.latency, link.bandwidth);
}

}  // namespace parallm::plan
