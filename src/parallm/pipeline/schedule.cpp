#include "parallm/pipeline/schedule.h"

#include <algorithm>
#include <map>
#include <tuple>

#include "parallm/core/error.h"

namespace parallm::pipeline {
namespace {

void check_sizes(std::string_view what, int p, int m, int v) {
  if (p < 1) fail("schedule", what, ": pipeline stages must be >= 1, got ", p);
  if (m < 1) fail("schedule", what, ": micro-batches must be >= 1, got ", m);
  if (v < 1) fail("schedule", what, ": chunks must be >= 1, got ", v);
}

// Appends the forward of (mb, chunk) on `stage` with its receive before and its send after.
void add_forward(const Schedule& s, std::vector<Action>& out, int stage, int mb, int chunk) {
  const int g = s.virtual_stage(stage, chunk);
  if (g > 0) out.push_back({ActionKind::RecvActivation, mb, chunk});
  out.push_back({ActionKind::Forward, mb, chunk});
  if (g < s.virtual_stages() - 1) out.push_back({ActionKind::SendActivation, mb, chunk});
}

// The whole backward, or for split schedules its input-gradient half B: the gradient goes to the
// previous stage at once, W comes later (add_weight).
void add_backward(const Schedule& s, std::vector<Action>& out, int stage, int mb, int chunk) {
  const int g = s.virtual_stage(stage, chunk);
  if (g < s.virtual_stages() - 1) out.push_back({ActionKind::RecvGrad, mb, chunk});
  out.push_back(
      {s.split_backward() ? ActionKind::BackwardInput : ActionKind::Backward, mb, chunk});
  if (g > 0) out.push_back({ActionKind::SendGrad, mb, chunk});
}

void add_weight(std::vector<Action>& out, int mb, int chunk) {
  out.push_back({ActionKind::BackwardWeight, mb, chunk});
}

Schedule empty(ScheduleKind kind, int p, int m, int v, bool forward_only) {
  Schedule s;
  s.kind = kind;
  s.stages = p;
  s.micro_batches = m;
  s.chunks = v;
  s.forward_only = forward_only;
  s.per_stage.resize(p);
  return s;
}

}  // namespace

std::string_view action_kind_name(ActionKind k) {
  switch (k) {
    case ActionKind::Forward:
      return "Forward";
    case ActionKind::Backward:
      return "Backward";
    case ActionKind::SendActivation:
      return "SendActivation";
    case ActionKind::RecvActivation:
      return "RecvActivation";
    case ActionKind::SendGrad:
      return "SendGrad";
    case ActionKind::RecvGrad:
      return "RecvGrad";
    case ActionKind::BackwardInput:
      return "BackwardInput";
    case ActionKind::BackwardWeight:
      return "BackwardWeight";
  }
  return "?";
}

std::string to_string(const Action& a) {
  std::string prefix;
  switch (a.kind) {
    case ActionKind::Forward:
      prefix = "F";
      break;
    case ActionKind::Backward:
      prefix = "B";
      break;
    case ActionKind::SendActivation:
      prefix = "sendA";
      break;
    case ActionKind::RecvActivation:
      prefix = "recvA";
      break;
    case ActionKind::SendGrad:
      prefix = "sendG";
      break;
    case ActionKind::RecvGrad:
      prefix = "recvG";
      break;
    case ActionKind::BackwardInput:
      prefix = "B";
      break;
    case ActionKind::BackwardWeight:
      prefix = "W";
      break;
  }
  std::string s = prefix + std::to_string(a.micro_batch);
  if (a.chunk != 0) s += "." + std::to_string(a.chunk);
  return s;
}

std::string_view schedule_kind_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::GPipe:
      return "gpipe";
    case ScheduleKind::OneFOneB:
      return "1f1b";
    case ScheduleKind::Interleaved:
      return "interleaved";
    case ScheduleKind::ZeroBubbleH1:
      return "zb-h1";
  }
  return "?";
}

ScheduleKind parse_schedule_kind(std::string_view s, std::string_view flag) {
  if (s == "gpipe") return ScheduleKind::GPipe;
  if (s == "1f1b" || s == "1F1B") return ScheduleKind::OneFOneB;
  if (s == "interleaved") return ScheduleKind::Interleaved;
  if (s == "zb-h1" || s == "ZB-H1") return ScheduleKind::ZeroBubbleH1;
  fail("schedule", flag, ": unknown schedule \"", s,
       "\" (choose gpipe, 1f1b, interleaved or zb-h1)");
}

Peer Schedule::peer(int stage, const Action& a) const {
  int g = virtual_stage(stage, a.chunk);
  switch (a.kind) {
    case ActionKind::SendActivation:
    case ActionKind::RecvGrad:
      ++g;
      break;
    case ActionKind::RecvActivation:
    case ActionKind::SendGrad:
      --g;
      break;
    default:
      fail("schedule", "peer(): ", to_string(a), " on stage ", stage, " is not a send/recv");
  }
  if (g < 0 || g >= virtual_stages())
    fail("schedule", name(), ": ", to_string(a), " on stage ", stage,
         " has no peer (virtual stage ", g, " out of 0..", virtual_stages() - 1, ")");
  return {g % stages, g / stages};
}

std::string Schedule::name() const {
  std::string s = cat(schedule_kind_name(kind), forward_only ? " (forward only)" : "",
                      " p=", stages, " m=", micro_batches);
  if (kind == ScheduleKind::Interleaved) s += cat(" v=", chunks);
  return s;
}

Schedule gpipe(int p, int m, bool forward_only) {
  check_sizes("gpipe", p, m, 1);
  Schedule s = empty(ScheduleKind::GPipe, p, m, 1, forward_only);
  for (int r = 0; r < p; ++r) {
    auto& out = s.per_stage[r];
    for (int mb = 0; mb < m; ++mb) add_forward(s, out, r, mb, 0);
    if (!forward_only)
      for (int mb = 0; mb < m; ++mb) add_backward(s, out, r, mb, 0);
  }
  return s;
}

Schedule one_f_one_b(int p, int m) {
  check_sizes("1f1b", p, m, 1);
  Schedule s = empty(ScheduleKind::OneFOneB, p, m, 1, false);
  for (int r = 0; r < p; ++r) {
    auto& out = s.per_stage[r];
    // Megatron: stage r runs p - r - 1 forwards before its first backward, so that the last stage
    // starts backward at once and each stage holds at most p - r micro-batches of activations.
    const int warmup = std::min(p - r - 1, m);
    const int steady = m - warmup;
    for (int i = 0; i < warmup; ++i) add_forward(s, out, r, i, 0);
    for (int i = 0; i < steady; ++i) {
      add_forward(s, out, r, warmup + i, 0);
      add_backward(s, out, r, i, 0);
    }
    for (int i = steady; i < m; ++i) add_backward(s, out, r, i, 0);
  }
  return s;
}

Schedule interleaved(int p, int m, int v) {
  check_sizes("interleaved", p, m, v);
  if (p < 2) fail("schedule", "interleaved: needs at least 2 pipeline stages, got ", p);
  if (m % p != 0)
    fail("schedule", "interleaved: micro-batches (", m, ") must be a multiple of stages (", p,
         "), as in Megatron-LM");
  Schedule s = empty(ScheduleKind::Interleaved, p, m, v, false);
  const int total = m * v;  // forward (and backward) chunk-steps per stage
  // The k-th forward on a stage runs micro-batch (k / (p v)) p + k % p of chunk (k % (p v)) / p:
  // groups of p micro-batches go through chunk 0, then chunk 1, ... Backwards run the chunks in
  // reverse order.
  auto mb_of = [&](int k) { return (k / (p * v)) * p + k % p; };
  auto chunk_of = [&](int k, bool forward) {
    const int c = (k % (p * v)) / p;
    return forward ? c : v - 1 - c;
  };
  for (int r = 0; r < p; ++r) {
    auto& out = s.per_stage[r];
    int warmup = m == p ? total : std::min(total, (p - r - 1) * 2 + (v - 1) * p);
    const int steady = total - warmup;
    for (int k = 0; k < warmup; ++k) add_forward(s, out, r, mb_of(k), chunk_of(k, true));
    for (int k = 0; k < steady; ++k) {
      add_forward(s, out, r, mb_of(k + warmup), chunk_of(k + warmup, true));
      add_backward(s, out, r, mb_of(k), chunk_of(k, false));
    }
    for (int k = steady; k < total; ++k) add_backward(s, out, r, mb_of(k), chunk_of(k, false));
  }
  return s;
}

Schedule zb_h1(int p, int m) {
  check_sizes("zb-h1", p, m, 1);
  Schedule s = empty(ScheduleKind::ZeroBubbleH1, p, m, 1, false);
  for (int r = 0; r < p; ++r) {
    auto& out = s.per_stage[r];
    // The W of micro-batch j waits for the B of j + r: stage r ends with r + 1 W's after its last
    // B (the W of that drain step and r deferred ones), exactly the time its last B's gradient
    // takes to reach stage 0 and run W there, so every stage finishes together.
    const int lag = r;
    int backwards = 0, weights = 0;
    auto backward = [&] {
      add_backward(s, out, r, backwards, 0);
      ++backwards;
      if (backwards - 1 - lag >= 0) add_weight(out, weights++, 0);
    };
    const int warmup = std::min(p - r - 1, m);
    for (int i = 0; i < warmup; ++i) add_forward(s, out, r, i, 0);
    for (int i = warmup; i < m; ++i) {
      add_forward(s, out, r, i, 0);
      backward();
    }
    while (backwards < m) backward();
    while (weights < m) add_weight(out, weights++, 0);
  }
  return s;
}

Schedule make_schedule(ScheduleKind kind, int p, int m, int v, bool forward_only) {
  if (kind != ScheduleKind::Interleaved && v != 1)
    fail("schedule", "--chunks ", v, " is only meaningful with --schedule interleaved");
  if (forward_only && kind != ScheduleKind::GPipe)
    fail("schedule", "forward-only (inference) schedules are GPipe; got ",
         schedule_kind_name(kind));
  switch (kind) {
    case ScheduleKind::GPipe:
      return gpipe(p, m, forward_only);
    case ScheduleKind::OneFOneB:
      return one_f_one_b(p, m);
    case ScheduleKind::Interleaved:
      return interleaved(p, m, v);
    case ScheduleKind::ZeroBubbleH1:
      return zb_h1(p, m);
  }
  fail("schedule", "unknown schedule kind");
}

void validate(const Schedule& s) {
  const std::string name = s.name();
  if (static_cast<int>(s.per_stage.size()) != s.stages)
    fail("schedule", name, ": has ", s.per_stage.size(), " stage lists, expected ", s.stages);
  // A message is (is_grad, micro-batch, sending virtual stage).
  using Msg = std::tuple<bool, int, int>;
  std::map<Msg, int> sends, recvs;
  for (int r = 0; r < s.stages; ++r) {
    const auto& list = s.per_stage[r];
    // Position of each action, for ordering checks.
    std::map<std::tuple<int, int, int>, int> pos;  // (kind, mb, chunk) -> index
    for (int i = 0; i < static_cast<int>(list.size()); ++i) {
      const Action& a = list[i];
      if (a.micro_batch < 0 || a.micro_batch >= s.micro_batches || a.chunk < 0 ||
          a.chunk >= s.chunks)
        fail("schedule", name, ": stage ", r, " action ", i, " (", to_string(a),
             ") names a micro-batch or chunk out of range");
      auto key = std::make_tuple(static_cast<int>(a.kind), a.micro_batch, a.chunk);
      if (pos.count(key))
        fail("schedule", name, ": stage ", r, " runs ", to_string(a), " twice (actions ", pos[key],
             " and ", i, ")");
      pos[key] = i;
      if (a.is_send() || a.is_recv()) {
        const Peer peer = s.peer(r, a);
        if (peer.stage == r)
          fail("schedule", name, ": stage ", r, " action ", to_string(a), " talks to itself");
        const bool grad = a.kind == ActionKind::SendGrad || a.kind == ActionKind::RecvGrad;
        const int sender =
            a.is_send() ? s.virtual_stage(r, a.chunk) : s.virtual_stage(peer.stage, peer.chunk);
        ++(a.is_send() ? sends : recvs)[Msg{grad, a.micro_batch, sender}];
      }
    }
    auto at = [&](ActionKind k, int mb, int c) {
      auto it = pos.find({static_cast<int>(k), mb, c});
      return it == pos.end() ? -1 : it->second;
    };
    for (int mb = 0; mb < s.micro_batches; ++mb) {
      for (int c = 0; c < s.chunks; ++c) {
        const int g = s.virtual_stage(r, c);
        const bool first = g == 0, last = g == s.virtual_stages() - 1;
        const std::string what = to_string(Action{ActionKind::Forward, mb, c});
        const int f = at(ActionKind::Forward, mb, c);
        if (f < 0) fail("schedule", name, ": stage ", r, " never runs ", what);
        const int ra = at(ActionKind::RecvActivation, mb, c);
        const int sa = at(ActionKind::SendActivation, mb, c);
        if (!first && !(ra >= 0 && ra < f))
          fail("schedule", name, ": stage ", r, " runs ", what,
               " without receiving its input first");
        if (!last && !(sa > f))
          fail("schedule", name, ": stage ", r, " never sends the output of ", what);
        const int whole = at(ActionKind::Backward, mb, c);
        const int bi = at(ActionKind::BackwardInput, mb, c);
        const int bw = at(ActionKind::BackwardWeight, mb, c);
        if (s.forward_only) {
          if (whole >= 0 || bi >= 0 || bw >= 0)
            fail("schedule", name, ": forward-only schedule has a backward on stage ", r);
          continue;
        }
        const bool split = s.split_backward();
        const ActionKind bkind = split ? ActionKind::BackwardInput : ActionKind::Backward;
        const std::string bname = to_string(Action{bkind, mb, c});
        const std::string wname = to_string(Action{ActionKind::BackwardWeight, mb, c});
        if (split ? whole >= 0 : (bi >= 0 || bw >= 0))
          fail("schedule", name, ": stage ", r, " runs micro-batch ", mb,
               split ? " as a whole Backward in a split-backward schedule"
                     : " as a split BackwardInput/BackwardWeight in a whole-backward schedule");
        const int b = split ? bi : whole;
        if (b < 0) fail("schedule", name, ": stage ", r, " never runs ", bname);
        if (b < f)
          fail("schedule", name, ": stage ", r, " runs the backward of micro-batch ", mb,
               " before its forward");
        if (split) {
          if (bw < 0) fail("schedule", name, ": stage ", r, " never runs ", wname);
          if (bw < b)
            fail("schedule", name, ": stage ", r, " runs ", wname, " before ", bname);
        }
        const int rg = at(ActionKind::RecvGrad, mb, c);
        const int sg = at(ActionKind::SendGrad, mb, c);
        if (!last && !(rg >= 0 && rg < b))
          fail("schedule", name, ": stage ", r, " runs backward ", mb, " without its gradient");
        if (!first && !(sg > b))
          fail("schedule", name, ": stage ", r, " never sends the gradient of micro-batch ", mb);
        // The point of splitting: the previous stage waits for B's gradient only, so nothing may
        // run between B and its send (a W there would put itself on the critical path).
        if (split && !first && sg != b + 1)
          fail("schedule", name, ": stage ", r, " does not send the gradient of ", bname,
               " right after it (action ", sg, ", expected ", b + 1, ")");
      }
    }
  }
  for (const auto& [msg, n] : sends) {
    if (n != 1 || recvs[msg] != 1)
      fail("schedule", name, ": ", std::get<0>(msg) ? "gradient" : "activation", " of micro-batch ",
           std::get<1>(msg), " from virtual stage ", std::get<2>(msg), " is sent ", n,
           " time(s) and received ", recvs[msg], " time(s)");
  }
  for (const auto& [msg, n] : recvs)
    if (!sends.count(msg))
      fail("schedule", name, ": stage receives ", std::get<0>(msg) ? "gradient" : "activation",
           " of micro-batch ", std::get<1>(msg), " from virtual stage ", std::get<2>(msg),
           " that nobody sends");
}

}  // namespace parallm::pipeline
