// `parallm plan`'s work as functions, so that `parallm playground`'s /api/plan answers with what
// `parallm plan --json` prints for the same inputs: the flags' checks (errors name the flag and
// value), the request they make, and the JSON.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "parallm/plan/cluster.h"
#include "parallm/plan/search.h"

namespace parallm::cli {

struct PlanOptions {
  std::string model;
  plan::ClusterOptions cluster;
  int64_t batch = 1, prompt_len = 512, output_len = 128;
  std::string dtype = "fp16", kv_dtype, act_dtype;
  std::string goal = "latency";
  int top = 5;
  bool json = false, list = false, tp_anywhere = false;
  bool enable_expert_parallel = false;  // only the experts-over-TP layouts (MoE inference)
  std::string calibrate;
  double mem_bw_gbps = 0, rank_mem_bw_gbps = 0, gflops = 0;
  double reread_gbps = 0;  // --gpu cpu decode: the GEMV's further passes over the weights
  int64_t gpus = 0, nodes = 0, gpus_per_node = 0;
  int64_t tp = 0, pp = 0, dp = 0, ep = 0;
  bool train = false;
  int64_t global_batch = 512, micro_batch = 1, seq_len = 4096;
  std::string optimizer = "adam", recompute = "selective", schedule = "1f1b";
  bool no_sp = false, sp = false;
  int zero = 0, chunks = 1;
  double bucket_mb = 25;
  bool no_overlap = false;
  int64_t threads = 0;
  int64_t shared_cores = 0;  // --gpu cpu inference: cores all ranks share (0: one each)
  // Whether a flag was on the command line: a count or rate given is checked even when its
  // value (0) is what the planner takes for "absent".
  std::function<bool(const char*)> given = [](const char*) { return false; };
};

// Checks every flag (std::invalid_argument naming it and its value), resolves the model and the
// cluster (measuring the CPU where asked) and makes the planner's request.
plan::PlanRequest make_plan_request(const PlanOptions& o);
// What `parallm plan --json` prints (before dump(2)).
nlohmann::json plan_json(const PlanOptions& o);

}  // namespace parallm::cli
