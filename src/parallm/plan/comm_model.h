// Communication costs with an alpha-beta model: a message of n bytes over a link takes
// alpha + n / beta. A collective over p ranks is a sequence of such steps; its time is the sum of
// the steps on the critical path, so that small messages (decode: one token's hidden state) pay
// the per-step latency, which bandwidth-only models (bytes / bandwidth) leave out.
//
// Algorithms (the ones parallm's comm layer runs, so the plan and the engine agree):
//   all-reduce      ring:      2 (p-1) alpha + 2 (p-1)/p n / beta
//                   recursive doubling: ceil(log2 p) (alpha + n / beta) (+2 steps if p is not a
//                   power of two); the cheaper of the two is used, as comm's Auto picks by size.
//   all-gather, reduce-scatter (n = the full buffer):
//                   ring (p-1) alpha + (p-1)/p n / beta; recursive doubling ceil(log2 p) alpha +
//                   (p-1)/p n / beta.
//   all-to-all      pairwise: (p-1) alpha + (p-1)/p n / beta (n = the whole send buffer)
//   p2p             alpha + n / beta
// With a calibration (bench comm output), a measured op replaces the formula: alpha_c + n / beta_c
// at the measured world size, scaled by the ring's step and volume factors for other sizes; a
// calibration's arrival skew (the wait for the last rank, measured in the workload) is added to
// every group collective, not to point-to-point messages; its token-bucket burst (burst_bytes)
// comes off a message that follows `idle_before` seconds without traffic on the link: the bytes
// the bucket refilled in that time, at most its size and the message, pass without the rate.
#pragma once

#include <string>

#include "parallm/plan/hardware.h"

namespace parallm::plan {

enum class Collective { AllReduce, AllGather, ReduceScatter, AllToAll, P2P };

std::string_view collective_name(Collective c);  // "all_reduce", ..., "sendrecv" (calibration keys)

struct CommCost {
  double seconds = 0;
  double bytes_sent = 0;  // bytes each rank sends (the per-device volume)
  std::string algorithm;  // "ring", "recursive-doubling", "pairwise", "p2p", "calibrated", "none"
};

// `bytes` is the whole buffer as in the table above; `p` the group size (p = 1 costs nothing).
CommCost collective_cost(Collective c, double bytes, int p, const LinkSpec& link,
                         const Calibration* cal = nullptr, double idle_before = 0);

}  // namespace parallm::plan
