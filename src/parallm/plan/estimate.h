// Time and memory of one layout: inference (time to first token, time per output token, tokens
// per second) and training (step time, tokens per second, MFU), on a roofline for compute and
// memory traffic plus alpha-beta communication (comm_model.h) and the pipeline schedule's timing
// (the simulator runs the same schedule lists as the executor).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "parallm/model/config.h"
#include "parallm/plan/comm_model.h"
#include "parallm/plan/hardware.h"
#include "parallm/plan/memory.h"
#include "parallm/plan/workload.h"

namespace parallm::plan {

struct PlanOptions {
  // TP normally stays inside an NVLink island (or a node when it has no NVLink); true lifts that.
  bool tp_anywhere = false;
  std::optional<Calibration> calibration;
  // bytes/s a decode stream reaches (measured); 0: the catalog's. Per device, except on a node
  // whose ranks share the memory (CPU): there it is the node's, shared by the ranks streaming.
  double mem_bw = 0;
  // CPU node: the most one rank streams alone with its share of the cores (measured); 0: the
  // device's figure (measured with the node's), or no cap when mem_bw is given without it.
  double rank_mem_bw = 0;
  double flops = 0;  // FLOP/s per rank (measured); 0: the catalog's
  // CPU decode: bytes/s a rank passes over its weights again from its caches, once per further
  // chunk of 4 tokens in a step (kernels/matmul.h: the GEMV streams the weights for the first 4
  // tokens and re-reads them from L1/L2 for each further 4); 0: no cost (not measured).
  double reread_bw = 0;
  // CPU inference: the cores every rank of the job shares (0: each rank has its own). With more
  // ranks than cores the ranks take turns: a step is at least the ranks' busy time over the
  // cores, and no more ranks stream memory at once than there are cores. (An emulated cluster of
  // several "nodes" on one machine, or mpirun --oversubscribe.)
  int shared_cores = 0;
  // Training on CPU ranks: what parallm's kernels reach here (measure_training_rates); when not
  // measured, every product runs at rank_flops.
  TrainingRates training_rates;
};

// One line of a cost: what, how many, how long in total on the critical path.
struct CostTerm {
  std::string name;    // "tp all-reduce", "pp p2p", ...
  int count = 0;       // calls per decode step (or training step)
  double bytes = 0;    // buffer bytes of one call
  double seconds = 0;  // all calls together
  std::string detail;  // link and algorithm
};

struct LayoutEstimate {
  Layout layout;
  bool training = false;
  bool fits = false;     // memory fits on every device
  bool allowed = false;  // placement rules hold (TP in an island, no idle replicas...)
  bool feasible() const { return fits && allowed; }
  std::vector<std::string> reasons;  // what holds it back, worst first

  MemoryBreakdown memory;  // of the fullest device
  double capacity = 0;     // usable bytes per device
  std::string tp_link, pp_link, dp_link;

  // Inference.
  int64_t replica_batch = 0;  // sequences per DP replica
  int micro_batches = 1;      // decode micro-batches through the pipeline
  double ttft = 0;            // seconds: prefill of the replica's batch
  double tpot = 0;            // seconds between two tokens of one sequence
  double tokens_per_s = 0;    // all replicas, prefill included: batch x output / (ttft + ...)
  double tokens_per_s_per_device = 0;
  double comm_bytes_per_token = 0;  // bytes the busiest device sends per generated token
  double decode_compute = 0;        // roofline time of all stages on a token's path
  bool decode_memory_bound = true;
  double decode_pipeline_wait = 0;     // tpot minus the path (micro-batches queueing at stages)
  std::vector<CostTerm> decode_terms;  // per decode step, summed over the token's path

  // Training.
  double step_time = 0;
  double mfu = 0;
  double bubble_fraction = 0;
  double forward_time = 0, backward_time = 0, p2p_time = 0;  // per micro-batch per stage
  double dp_comm_time = 0, optimizer_time = 0;
  // The part of dp_comm_time the step waits for (the rest overlaps the last backward), and the
  // buckets the dense gradients are reduced in.
  double dp_comm_exposed = 0;
  int dp_buckets = 0;
  double peak_in_flight = 0;  // micro-batches held by stage 0
  // Per pipeline stage: held activations (the fullest TP rank) under the schedule, by walking its
  // action list with activation_bytes_per_chunk's bytes.
  std::vector<StageActivations> stage_activations;
  std::vector<double> stage_in_flight;  // [stage] the simulator's peak, micro-batch units
  // [stage] seconds per micro-batch the simulator ran: forward, whole backward, and ZB-H1's W
  // share of it (the weight-gradient products).
  std::vector<double> stage_forward_time, stage_backward_time, stage_weight_time;
  std::vector<CostTerm> step_terms;
};

// Compute and memory rates per rank: measured ones (options, calibration) or catalog x efficiency.
// CPU ranks of one node share its memory bandwidth.
double rank_flops(const ClusterSpec& cl, const PlanOptions& o);
// Bytes/s one rank streams while `streaming` ranks of its node stream at once (on the average:
// ranks that stream part of the time count as that part): the device's (or the measured) rate;
// on a CPU node, the node's rate shared by the streaming ranks, and at most what one rank reaches
// alone (at batch 1 a pipeline has one stage streaming at a time).
double rank_mem_bw(const ClusterSpec& cl, const PlanOptions& o, double streaming);

// Placement problem of the layout on the cluster ("" if none): TP outside an NVLink island or a
// node, more ranks than devices.
std::string placement_problem(const ClusterSpec& cl, const Layout& l, const PlanOptions& o);

// Why `l` cannot train `c` with `w` ("" when it can): layout_problem, then what the workload asks
// of the layout (DP x micro-batch divides the global batch; the interleaved schedule's micro-
// batches and layers divide by PP). Throws std::invalid_argument when `w` itself is invalid
// (a size below 1), whatever the layout.
std::string training_problem(const ModelConfig& c, const Layout& l, const TrainingWorkload& w);

// Seconds as the reports show them: "0.123 ms" below 10 ms, "12.34 ms" from there.
std::string ms_text(double seconds);

// Throws std::invalid_argument when the layout cannot run the model (layout_problem; for training
// training_problem) or does not use exactly the cluster's devices.
LayoutEstimate estimate_inference(const ModelConfig& c, const ClusterSpec& cl, const Layout& l,
                                  const InferenceWorkload& w, const PlanOptions& o);
LayoutEstimate estimate_training(const ModelConfig& c, const ClusterSpec& cl, const Layout& l,
                                 const TrainingWorkload& w, const PlanOptions& o);

// Model FLOPs per token of training (forward + backward, no recompute): 6 N_active for the
// linear layers + 6 L q_dim s for causal attention scores and values (PaLM's 12 L h s counts the
// masked half too; the time model does not run it, so neither does MFU here).
double training_flops_per_token(const ModelConfig& c, int64_t seq_len);

}  // namespace parallm::plan
