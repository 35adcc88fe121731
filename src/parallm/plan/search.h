// The search: every (tp, pp, dp, ep) that uses the cluster's devices (for MoE inference also each
// TP > 1 with the experts over TP, vLLM's --enable-expert-parallel), estimated, ranked by the
// goal, with the reasons each layout loses to the best; and the report (table or JSON).
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "parallm/model/config.h"
#include "parallm/plan/estimate.h"

namespace parallm::plan {

enum class Goal { Latency, Throughput };
Goal parse_goal(std::string_view s, std::string_view flag = "--goal");

struct PlanRequest {
  ModelConfig model;
  std::string model_name;
  ClusterSpec cluster;
  bool training = false;
  InferenceWorkload inference;
  TrainingWorkload train;
  Goal goal = Goal::Latency;
  PlanOptions options;
  Layout pinned{0, 0, 0, 0};  // a degree > 0 restricts the search to it
  // plan --enable-expert-parallel: only the experts-over-TP layouts (MoE inference); otherwise they
  // are ranked beside the others.
  bool only_experts_over_tp = false;
};

struct Rejected {
  Layout layout;
  std::string why;
};

struct PlanResult {
  std::vector<LayoutEstimate> ranked;  // feasible first, best first
  std::vector<Rejected> rejected;      // layouts that cannot run the model at all
};

// Throws std::invalid_argument when nothing can run (naming why), or when a fully pinned layout
// cannot run the model.
PlanResult search(const PlanRequest& req);

// {"model", "params", "active_params", "hardware", "workload", "goal", "layouts": [...],
//  "rejected": [...]}; each layout has tp, pp, dp, ep, fits, feasible, weights_bytes_per_device,
// kv_cache_bytes_per_device, activation_bytes_per_device, ..., comm_bytes_per_token, ttft_ms,
// tpot_ms, tokens_per_s, reasons (training: step_time_s, tokens_per_s, mfu, bubble_fraction...).
nlohmann::json to_json(const PlanRequest& req, const PlanResult& res);
// The human report: header, the best `top` layouts as a table, the best one's cost breakdown, why
// the others lost.
std::string render_report(const PlanRequest& req, const PlanResult& res, int top);

}  // namespace parallm::plan
