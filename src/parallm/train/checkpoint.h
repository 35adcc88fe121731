// Training checkpoints: a Hugging Face directory that `parallm generate --model DIR` loads as it
// is, plus what training needs to continue bit for bit.
//
//   DIR/config.json              the model (torch_dtype float32)
//   DIR/model.safetensors        every tensor whole, f32 (gathered over TP, and over PP from
//                                every stage, each tensor once: a tied embedding's head copy on
//                                the last stage is not written)
//   DIR/tokenizer.model|.json    copied from the model or --tokenizer, when there is one
//   DIR/optimizer.safetensors    AdamW's m and v whole, f32, named "exp_avg.<tensor>" and
//                                "exp_avg_sq.<tensor>" (gathered over TP, PP and, with ZeRO, DP)
//   DIR/trainer_state.json       {"format_version": 1, "step": k, "options": {...},
//                                 "layout": {"tp", "pp", "dp", "zero", "virtual_stages",
//                                 "stage_layers"}}: the layout it was written under, for people
//                                and `parallm checkpoint info`; loading never reads it
//
// One consolidated directory is the whole resharding story: every rank of any layout (TP, PP with
// any layer split or virtual stages, DP, ZeRO on or off) reads its own slices of the tensors its
// stage holds by name, and of their m and v, so no reshard step exists or is needed.
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
  int64_t step = 0;        // steps done
  nlohmann::json options;  // the options that matter for a bit-exact continuation
  // What save_checkpoint wrote as "layout" (null for checkpoints from before it did): the
  // layout the checkpoint was written under. Informational; save_checkpoint ignores this field
  // and records the layout it runs under.
  nlohmann::json layout;
};

// Reads DIR/config.json and DIR/trainer_state.json (and checks the two safetensors files are
// there); throws std::invalid_argument naming `flag`, the file and field otherwise.
CheckpointInfo read_checkpoint_info(const std::string& dir, const std::string& flag = "--resume");

// The first config.json field in which two models differ ("hidden_size: 64 vs 96"), or "" when
// they are the same model (torch_dtype is ignored: it is the storage, not the model).
std::string config_difference(const ModelConfig& mine, const ModelConfig& theirs);

// Throws std::invalid_argument naming `flag` when `dir` exists and is neither empty nor a parallm
// checkpoint (so saving would destroy something else).
void check_save_target(const std::string& dir, const std::string& flag);

// Collective over the whole mesh (every rank calls it, each with its own ParamStore, holding its
// stage's tensors, and DataParallel): m and v whole over DP (ZeRO), every tensor whole over TP
// (on DP rank 0 of each stage), then every stage's tensors to world rank 0 over the PP group of
// TP rank 0 / DP rank 0; world rank 0 writes `dir` and copies `tokenizer_files` into it as
// tokenizer.model / tokenizer.json. Threads: the TP, PP and world groups are called from the
// calling thread (the rank's, which owns them), the DP group only through
// DataParallel::run_on_comm.
// Expert parallelism (mesh EP > 1, PP 1): `experts` is the reducer of the experts' range (dp
// then holds the rest); the first EP block's ranks gather their tensors over TP, and its EP
// ranks send their experts to EP rank 0 (world rank 0), so the files hold every expert whole.
void save_checkpoint(const std::string& dir, const ModelConfig& config, ParamStore& params,
                     DataParallel& dp, const comm::Mesh& mesh, const CheckpointInfo& state,
                     const std::vector<std::string>& tokenizer_files,
                     DataParallel* experts = nullptr);

// Per rank (no communication): this rank's slices of the values of the tensors its stage holds
// (params.stage(); a tied head copy reads the embedding), and of their m and v, from `dir`,
// whatever layout wrote it. `tp` and `tp_rank` must be the ParamStore's (std::invalid_argument
// otherwise); dp must be built over `params`' layout (with `experts`: dp over all but the
// experts' range, `experts` over it). Under EP a rank reads only its experts.
void load_checkpoint(const std::string& dir, const ModelConfig& config, ParamStore& params,
                     DataParallel& dp, int tp, int tp_rank, DataParallel* experts = nullptr);

}  // namespace parallm::train
