// parallm checkpoint info DIR: what a training checkpoint holds (the model, the step, the options
// of the run) and the layout it was written under. There is no reshard command: the checkpoint is
// one consolidated directory that every layout loads directly (train/checkpoint.h).
#include "parallm/train/checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <string>

#include "parallm/cli/command.h"

namespace parallm::cli {
namespace {

std::string layout_line(const nlohmann::json& l) {
  auto num = [&](const char* k) {
    return l.contains(k) && l[k].is_number_integer() ? std::to_string(l[k].get<int64_t>())
                                                     : std::string("?");
  };
  std::string s = "tp " + num("tp") + " x pp " + num("pp") + " x dp " + num("dp");
  if (l.contains("zero") && l["zero"] == 1) s += " (ZeRO-1)";
  if (l.contains("virtual_stages") && l["virtual_stages"].is_number_integer() &&
      l["virtual_stages"].get<int64_t>() > 1)
    s += ", " + num("virtual_stages") + " virtual stages";
  if (l.contains("stage_layers") && l["stage_layers"].is_array() && l["stage_layers"].size() > 1) {
    s += "; layers per stage:";
    for (const nlohmann::json& stage : l["stage_layers"]) {
      s += " ";
      bool first = true;
      for (const nlohmann::json& r : stage) {
        if (!r.is_array() || r.size() != 2) continue;
        s += (first ? "" : "+") + r[0].dump() + "-" + std::to_string(r[1].get<int64_t>() - 1);
        first = false;
      }
    }
  }
  return s;
}

int run_info(const std::string& dir) {
  const train::CheckpointInfo info = train::read_checkpoint_info(dir, "checkpoint info");
  const ModelConfig& c = info.config;
  std::printf("checkpoint %s\n", dir.c_str());
  std::printf(
      "  model:   %lld parameters, %lld layers, hidden %lld, %lld heads / %lld KV heads, "
      "FFN %lld, vocabulary %lld%s\n",
      static_cast<long long>(c.param_count()), static_cast<long long>(c.num_hidden_layers),
      static_cast<long long>(c.hidden_size), static_cast<long long>(c.num_attention_heads),
      static_cast<long long>(c.num_key_value_heads), static_cast<long long>(c.intermediate_size),
      static_cast<long long>(c.vocab_size), c.tie_word_embeddings ? ", tied embeddings" : "");
  std::printf("  step:    %lld\n", static_cast<long long>(info.step));
  if (info.layout.is_object())
    std::printf("  written: %s\n", layout_line(info.layout).c_str());
  else
    std::printf("  written: layout not recorded (a checkpoint from before layouts were)\n");
  std::printf(
      "  loads:   at any TP x PP x DP layout the model fits (ZeRO on or off, any layer "
      "split, virtual stages): no resharding step\n");
  if (!info.options.empty()) std::printf("  options: %s\n", info.options.dump().c_str());
  return 0;
}

[[maybe_unused]] const bool registered = register_command(
    {"checkpoint info",
     "Print a training checkpoint's model, step and the layout it was written under",
     [](CLI::App& app) {
       auto dir = std::make_shared<std::string>();
       app.add_option("DIR", *dir, "Checkpoint directory (parallm train --save)")->required();
       return [dir] { return run_info(*dir); };
     }});

}  // namespace
}  // namespace parallm::cli
