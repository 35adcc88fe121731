// How the generation loops (batch_generate.cpp: StepPlan; serve_loop.cpp: ServePlan) move a
// micro-batch between stages: its plan, without the ids, travels as the header of its activations
// to the same TP rank of the next stage, so a later stage learns plan j exactly when j's
// activations arrive (batch_generate.h says why this needs no other message).
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/pipeline/executor.h"
#include "parallm/pipeline/p2p.h"

namespace parallm {

// Sets cb.recv_activation and cb.send_activation for stage `stage`: received plans go to
// plans[j] and their activations (hidden values per token) to received[j]; activations(j) is
// what this stage sends for micro-batch j. Plan needs encode(bool with_ids), tokens() and a
// static decode(const int64_t*, size_t). `who` names the loop in errors.
template <class Plan>
void set_plan_transport(pipeline::StageCallbacks& cb, pipeline::StageLink& link, int stage,
                        int64_t hidden, std::vector<Plan>& plans,
                        std::vector<pipeline::Activation*>& received,
                        std::function<float*(int)> activations, const char* who) {
  cb.recv_activation = [&link, &plans, &received, stage, hidden, who](int j, int) {
    pipeline::Activation& a = link.recv_activation(stage - 1, j, 0);
    plans[j] = Plan::decode(a.header.data(), a.header.size());
    if (static_cast<int64_t>(a.data.size()) != plans[j].tokens() * hidden)
      fail<std::runtime_error>(who, "stage ", stage, ": micro-batch ", j, " brought ",
                               a.data.size(), " values for ", plans[j].tokens(), " tokens");
    received[j] = &a;
  };
  cb.send_activation = [&link, &plans, stage, hidden, activations](int j, int) {
    const std::vector<int64_t> header = plans[j].encode(false);
    link.send_activation(stage + 1, j, 0, header.data(), static_cast<int>(header.size()),
                         activations(j), static_cast<size_t>(plans[j].tokens() * hidden));
  };
}

}  // namespace parallm
