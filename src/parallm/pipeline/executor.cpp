#include "parallm/pipeline/executor.h"

#include "parallm/core/error.h"
#include "parallm/core/trace.h"

namespace parallm::pipeline {

void execute_stage(const Schedule& schedule, int stage, const StageCallbacks& cb) {
  for (const Action& a : schedule.actions(stage)) {
    const std::function<void(int, int)>* fn = nullptr;
    const char* category = "compute";
    switch (a.kind) {
      case ActionKind::Forward:
        fn = &cb.forward;
        break;
      case ActionKind::Backward:
        fn = &cb.backward;
        break;
      case ActionKind::BackwardInput:
        fn = &cb.backward_input;
        break;
      case ActionKind::BackwardWeight:
        fn = &cb.backward_weight;
        break;
      case ActionKind::SendActivation:
        fn = &cb.send_activation;
        category = "p2p";
        break;
      case ActionKind::RecvActivation:
        fn = &cb.recv_activation;
        category = "wait";
        break;
      case ActionKind::SendGrad:
        fn = &cb.send_grad;
        category = "p2p";
        break;
      case ActionKind::RecvGrad:
        fn = &cb.recv_grad;
        category = "wait";
        break;
    }
    if (!*fn)
      fail("pipeline", "stage ", stage, " of ", schedule.name(), ": no handler for action ",
           to_string(a));
    TraceSpan span(to_string(a), category);
    (*fn)(a.micro_batch, a.chunk);
  }
}

}  // namespace parallm::pipeline
