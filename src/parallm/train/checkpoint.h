// Training checkpoints: a Hugging Face directory that `parallm generate --model DIR` loads as it
// is, plus what training needs to continue bit for bit.
//
//   DIR/config.json              the model (torch_dtype float32)
//   DIR/model.safetensors        every tensor whole, f32 (gathered over TP)
//   DIR/tokenizer.model|.json    copied from the model or --tokenizer, when there is one
//   DIR/optimizer.safetensors    AdamW's m and v whole, f32, named "exp_avg.<tensor>" and
//                                "exp_avg_sq.<tensor>" (gathered over TP and, with ZeRO, DP), so
//                                a run may resume at any TP x DP layout
//   DIR/trainer_state.json       {"format_version": 1, "step": k, "options": {...}}
//
// Writing goes to a temporary sibling directory that is swapped in when complete (renameat2
// RENAME_EXCHANGE, or two renames), so a crash never leaves half a checkpoint at DIR, and a
// directory that is not a parallm checkpoint is never replaced.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "parallm/comm/mesh.h"
#include "parallm/model/config.h"
#include "parallm/train/dp.h"
#include "parallm/train/params.h"

namespace parallm::train {

constexpr int kCheckpointFormat = 1;

struct CheckpointInfo {
  ModelConfig config;
  int64_t step = 0;       // steps done
  nlohmann::json options;  // the options that matter for a bit-exact continuation
};

// Reads DIR/config.json and DIR/trainer_state.json (and checks the two safetensors files are
// there); throws std::invalid_argument naming the file and field otherwise.
CheckpointInfo read_checkpoint_info(const std::string& dir);

// The first config.json field in which two models differ ("hidden_size: 64 vs 96"), or "" when
// they are the same model (torch_dtype is ignored: it is the storage, not the model).
std::string config_difference(const ModelConfig& mine, const ModelConfig& theirs);

// Throws std::invalid_argument naming `flag` when `dir` exists and is neither empty nor a parallm
// checkpoint (so saving would destroy something else).
void check_save_target(const std::string& dir, const std::string& flag);

// Collective over the mesh's TP and DP groups (every rank calls it, each with its own ParamStore
// and DataParallel): gathers the values and the optimizer state whole; world rank 0 writes `dir`
// and copies `tokenizer_files` into it as tokenizer.model / tokenizer.json.
void save_checkpoint(const std::string& dir, const ModelConfig& config, ParamStore& params,
                     DataParallel& dp, const comm::Mesh& mesh, const CheckpointInfo& state,
                     const std::vector<std::string>& tokenizer_files);

// Per rank (no communication): this rank's slices of the values and of m and v from `dir`.
void load_checkpoint(const std::string& dir, const ModelConfig& config, ParamStore& params,
                     DataParallel& dp, int tp, int tp_rank);

}  // namespace parallm::train
