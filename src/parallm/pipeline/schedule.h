// Pipeline schedules as data: for each pipeline stage (rank in the PP group), the ordered list of
// actions it performs for one training step (or one inference batch). The pipeline executor runs
// these lists; the simulator (simulator.h) times and draws the very same lists.
//
// Model chunks. With interleaving (Megatron's virtual pipeline), each stage holds `chunks` (v)
// model chunks; local chunk c on stage r is the global virtual stage g = c * p + r, and the layers
// run in the order g = 0, 1, ..., v * p - 1. Without interleaving v = 1 and g = r.
//
// Semantics the executor must keep (and the simulator assumes):
//   - Recv* blocks until the matching Send* has arrived.
//   - Send* does not wait for the receiver (buffered: MPI_Isend completed before the step ends, or
//   a
//     queue between threads). The lists are deadlock-free under these rules (tested), not under
//     rendezvous sends.
//   - An action names the LOCAL chunk it belongs to; its peer follows from the chunk graph:
//       SendActivation(mb, c): output of Forward(mb, c) -> virtual stage g + 1
//       RecvActivation(mb, c): input of Forward(mb, c)  <- virtual stage g - 1
//       SendGrad(mb, c):       input-gradient of Backward(mb, c) -> virtual stage g - 1
//       RecvGrad(mb, c):       output-gradient for Backward(mb, c) <- virtual stage g + 1
//     The first virtual stage has no RecvActivation/SendGrad, the last no SendActivation/RecvGrad.
//
// Split backwards (zero-bubble schedules, Qi et al. 2023). A schedule runs each (mb, chunk)'s
// backward either as one Backward, or as BackwardInput ("B": the input gradient, which is all the
// previous stage waits for; RecvGrad comes before it and SendGrad right after it) followed later by
// BackwardWeight ("W": the weight gradients, which nobody waits for, so they fill the bubble). The
// activations of (mb, chunk) are held from its Forward until its Backward, or until its
// BackwardWeight when split: W still needs the layer inputs.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace parallm::pipeline {

enum class ActionKind {
  Forward,
  Backward,
  SendActivation,
  RecvActivation,
  SendGrad,
  RecvGrad,
  BackwardInput,   // split backward, part 1: input gradient (then SendGrad)
  BackwardWeight,  // split backward, part 2: weight gradients
};

// "Forward", "SendActivation", "BackwardInput", ...
std::string_view action_kind_name(ActionKind k);

struct Action {
  ActionKind kind = ActionKind::Forward;
  int micro_batch = 0;
  int chunk = 0;  // local model chunk, 0..v-1

  bool is_compute() const {
    return kind == ActionKind::Forward || kind == ActionKind::Backward ||
           kind == ActionKind::BackwardInput || kind == ActionKind::BackwardWeight;
  }
  bool is_send() const {
    return kind == ActionKind::SendActivation || kind == ActionKind::SendGrad;
  }
  bool is_recv() const {
    return kind == ActionKind::RecvActivation || kind == ActionKind::RecvGrad;
  }
  bool operator==(const Action&) const = default;
};

// "F3", "B3", "F3.1" (chunk 1), "sendA3", "recvG3"; BackwardInput "B3" too (a schedule has either
// whole or split backwards, never both), BackwardWeight "W3".
std::string to_string(const Action& a);

// The peer of a send or receive: stage (rank) and local chunk on that stage.
struct Peer {
  int stage = 0;
  int chunk = 0;
};

enum class ScheduleKind { GPipe, OneFOneB, Interleaved, ZeroBubbleH1 };

// "gpipe", "1f1b", "interleaved", "zb-h1"
std::string_view schedule_kind_name(ScheduleKind k);
// Accepts "gpipe", "1f1b", "interleaved", "zb-h1"; throws std::invalid_argument naming `flag`
// otherwise.
ScheduleKind parse_schedule_kind(std::string_view s, std::string_view flag = "--schedule");

struct Schedule {
  ScheduleKind kind = ScheduleKind::GPipe;
  int stages = 1;         // p
  int micro_batches = 1;  // m
  int chunks = 1;         // v (model chunks per stage)
  bool forward_only = false;
  std::vector<std::vector<Action>> per_stage;  // [p][actions in order]

  const std::vector<Action>& actions(int stage) const { return per_stage.at(stage); }
  int virtual_stages() const { return stages * chunks; }
  int virtual_stage(int stage, int chunk) const { return chunk * stages + stage; }
  // Where a Send*/Recv* on `stage` goes to / comes from.
  Peer peer(int stage, const Action& a) const;
  std::string name() const;  // "1f1b p=4 m=8", "interleaved p=4 m=8 v=2"
  // Whether backwards are split into BackwardInput and BackwardWeight (zb-h1).
  bool split_backward() const { return kind == ScheduleKind::ZeroBubbleH1; }
};

// GPipe: all forwards, then all backwards (micro-batches in order). forward_only drops the backward
// half: the schedule inference uses.
Schedule gpipe(int p, int m, bool forward_only = false);
// 1F1B as in Megatron-LM: stage r warms up with min(p - r - 1, m) forwards, then alternates one
// forward and one backward, then drains the remaining backwards.
Schedule one_f_one_b(int p, int m);
// Interleaved 1F1B (Megatron-LM virtual pipeline): v chunks per stage; needs p >= 2 and m % p == 0.
Schedule interleaved(int p, int m, int v);
// ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", the H1 schedule): 1F1B with each
// backward split into B (input gradient, SendGrad right after) and W (weight gradient). Stage r
// warms up with min(p - r - 1, m) forwards like 1F1B, then alternates F and B, then drains the
// remaining B's; the W of micro-batch j runs right after the B of micro-batch j + r, and the last
// r W's run after the last B, where 1F1B's drain bubble was. Every stage then holds at most
// min(p, m) micro-batches (F done, W not): 1F1B's peak on stage 0, its largest, as the paper's H1
// promises, though not 1F1B's smaller p - r on later stages: the short bubble needs them, since
// stage r's last B must end r + 1 W's before the step does, and the last stage's W's of its last p
// micro-batches are then all still to run. With F, B and W of equal time t and m >= p the step
// takes (3m + p - 1) t: a bubble of p - 1 units per stage against 1F1B's 3 (p - 1). Any m >= 1 is
// valid (the closed forms are in simulator.h).
Schedule zb_h1(int p, int m);
// Dispatch by kind; forward_only is valid for GPipe only (inference), v for interleaved only.
Schedule make_schedule(ScheduleKind kind, int p, int m, int v = 1, bool forward_only = false);

// Structural checks (not timing): counts of every action per micro-batch and chunk, every receive
// has exactly one matching send on its peer and the other way round, no stage sends to itself,
// each Forward is preceded by its RecvActivation and followed by its SendActivation (same for
// Backward/grads), and each Backward comes after its own Forward. Split schedules (zb-h1) have,
// per (mb, chunk), a BackwardInput after the Forward (RecvGrad before it, its SendGrad the very
// next action) and a BackwardWeight after the BackwardInput, and no whole Backward; the others have
// no split kinds. Throws std::invalid_argument naming the stage and the action at fault.
void validate(const Schedule& s);

}  // namespace parallm::pipeline
