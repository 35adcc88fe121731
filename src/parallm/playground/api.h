// The JSON API of `parallm playground` (docs/playground.md): each endpoint takes the request body
// as JSON and answers JSON, computed by the same code as the CLI (cli/plan.h, cli/schedule.h), so
// that /api/plan returns what `parallm plan --json` prints for the same inputs. Bad input throws
// std::invalid_argument with one line naming the field and value (the server answers 400).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace parallm::playground {

// Bounds of what the page may send: far above any real trace or config, small enough that one
// request cannot hold the server long.
constexpr size_t kMaxBodyBytes = size_t(64) << 20;
constexpr size_t kMaxTraceSpans = 200000;
constexpr int64_t kMaxScheduleCells = 16384;  // p x m x v of /api/schedule

// {"model": preset | "config": config.json text or object, "gpu", "gpus", "nodes", "gpus_per_node",
//  "link", "inter_node", "topology": `nvidia-smi topo -m` text, "batch", "prompt_len",
//  "output_len", "dtype", "kv_dtype", "act_dtype", "goal", "tp", "pp", "dp", "ep", "train",
//  "global_batch", "micro_batch", "seq_len", "optimizer", "recompute", "zero", "schedule",
//  "chunks", ...}: the flags of `parallm plan` with '_' for '-'. Answers plan --json's object.
nlohmann::json api_plan(const nlohmann::json& body);

// {"p", "m", "v", "schedule", "forward", "backward", "weight", "p2p", "forward_only",
//  "stage_forward", "stage_backward", "stage_weight"}: `parallm schedule`'s flags. Answers the
// simulated timeline per stage (F, B, W actions with start/end; idle), makespan, bubble fraction,
// the formula's value and text, and the peak in-flight micro-batches with their formula.
nlohmann::json api_schedule(const nlohmann::json& body);

// A Chrome trace (`generate --trace`, `train --trace`: an array of events or {"traceEvents"}):
// per-rank spans relative to the first, busy and idle time, the measured bubble; for pipeline
// training traces also the last step's F/B/W actions and the per-stage mean times.
nlohmann::json api_trace(const nlohmann::json& body);

// {"model" | "config", "tp", "dtype" (activations, default fp16), "link" (default nvlink4)}: the
// weight shards each TP rank holds (shapes), the collectives of one decoded token and the bytes
// each rank sends for them (what --comm-stats counts; the planner's comm_bytes_per_token).
nlohmann::json api_layer_split(const nlohmann::json& body);

// The presets the page offers: models, devices, links, schedules.
nlohmann::json api_presets();

}  // namespace parallm::playground
