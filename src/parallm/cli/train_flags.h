// The 3D-training flags `parallm train` and `parallm bench train` share: the pipeline (--pp,
// --schedule, --virtual-stages, --pp-layers), --sp, --recompute, --ep, --trace and --comm-stats.
#pragma once

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <string>
#include <vector>

#include "parallm/core/error.h"
#include "parallm/train/trainer.h"

namespace parallm::cli {

// "3,2,3": positive integers separated by commas; the reason in one line otherwise.
inline std::string parse_layer_counts(const std::string& text, std::vector<int64_t>* out,
                                      const char* flag) {
  out->clear();
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    int64_t v = 0;
    const char* b = text.data() + at;
    const char* e = text.data() + comma;
    const auto [end, ec] = std::from_chars(b, e, v);
    if (b == e || ec != std::errc() || end != e || v < 1)
      return cat(flag, " must be positive layer counts separated by commas, got \"", text, "\"");
    out->push_back(v);
    at = comma + 1;
  }
  return "";
}

inline void add_pipeline_flags(CLI::App& app, train::TrainOptions& o) {
  app.add_option("--pp", o.pp, "Pipeline stages (default 1; world size = tp x pp x dp)")
      ->check(CLI::PositiveNumber);
  app.add_option("--schedule", o.schedule,
                 "Pipeline schedule with --pp > 1: gpipe, 1f1b (default), interleaved (Megatron's "
                 "virtual pipeline: --virtual-stages V, micro-batches per DP rank a multiple of "
                 "--pp, at least pp x V layers) or zb-h1 (zero-bubble H1: B and W apart)");
  app.add_option("--virtual-stages", o.virtual_stages,
                 "Model chunks per stage with --schedule interleaved (default 1)")
      ->check(CLI::PositiveNumber);
  app.add_option_function<std::string>(
         "--pp-layers",
         [&o](const std::string& text) {
           if (std::string why = parse_layer_counts(text, &o.pp_layers, "--pp-layers");
               !why.empty())
             throw CLI::ValidationError(why);
         },
         "Layers per virtual stage, e.g. 3,2,3 (pp x V counts summing to the model's layers; "
         "default: as even as possible, the middle stages taking the leftovers)")
      ->type_name("N,N,...");
  app.add_flag("--sp", o.sp,
               "Sequence parallelism (with --tp >= 2: norms and residuals split along the "
               "sequence, all-reduce as reduce-scatter + all-gather); a no-op at --tp 1");
  app.add_option("--recompute", o.recompute,
                 "Activation recomputation: none (default), selective (the attention's softmax "
                 "probabilities), full (a layer's input only)")
      ->check(CLI::IsMember({"none", "selective", "full"}));
  app.add_option("--ep", o.ep,
                 "Expert parallelism for mixture-of-experts models (Mixtral): EP ranks are "
                 "data-parallel ranks each computing E/EP experts, tokens exchanged by all-to-all "
                 "(default 1; world size = tp x pp x dp x ep)")
      ->check(CLI::PositiveNumber);
  app.add_option("--trace", o.trace,
                 "Write a Chrome trace (JSON) of every rank: F, B, W, sends and receives per "
                 "stage, layers and collectives, and the DP gradient buckets' reductions (on the "
                 "communication thread, a row of their own)");
  app.add_flag("--comm-stats", o.comm_stats,
               "Print calls, bytes and time per collective and group at exit (rank 0's, the DP "
               "gradient buckets included)");
}

}  // namespace parallm::cli
