// The executor: runs one stage's list of actions from a Schedule (schedule.h), in order, by
// calling what the caller supplies for each kind of action. Inference supplies forward and the
// activation transfers; training adds backward and the gradient transfers. One executor serves
// every schedule, so a new schedule is a new list, not new control flow.
#pragma once

#include <functional>

#include "parallm/pipeline/schedule.h"

namespace parallm::pipeline {

struct StageCallbacks {
  std::function<void(int micro_batch, int chunk)> forward, backward;
  // Split backward (zb-h1): the input gradient (what SendGrad sends) and, later, the weight
  // gradients of the same (micro-batch, chunk).
  std::function<void(int micro_batch, int chunk)> backward_input, backward_weight;
  std::function<void(int micro_batch, int chunk)> send_activation, recv_activation;
  std::function<void(int micro_batch, int chunk)> send_grad, recv_grad;
};

// Runs schedule.actions(stage) in order. An action whose callback is empty is an error
// (std::invalid_argument naming the stage and the action): a schedule the caller cannot run.
void execute_stage(const Schedule& schedule, int stage, const StageCallbacks& callbacks);

}  // namespace parallm::pipeline
