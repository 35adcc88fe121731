// The MoE families against the PyTorch reference (tests/reference/llama_ref.py, written from the
// formulas): greedy tokens from one rank's generate() and the reference's, and the worst
// normalised logit error between them. Shared by the Mixtral and qwen2_moe tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <cctype>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "parallm/engine/generate.h"
#include "parallm/model/weights.h"
#include "test_util.h"

namespace parallm::testing {

// Expects the same `steps` greedy tokens after `prompt` from parallm (f32 weights, one rank) and
// the reference, and returns the worst normalised logit error (or +inf after a failed check).
// `name` labels the printed line. The caller skips when /usr/bin/python3 has no torch.
inline double moe_reference_error(const std::string& dir, const TempDir& tmp, const char* name,
                                  const std::vector<int32_t>& prompt, int steps) {
  std::string ids;
  for (int32_t id : prompt) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const std::string out = tmp.file("ref.json");
  auto r = run_command("/usr/bin/python3 " PARALLM_SOURCE_DIR
                       "/tests/reference/llama_ref.py --model " +
                       dir + " --prompt-ids " + ids + " --steps " + std::to_string(steps) +
                       " --out " + out);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  if (r.exit_code != 0) return 1e300;
  std::ifstream in(out);
  const nlohmann::json ref = nlohmann::json::parse(in);

  ModelConfig config;
  auto source = open_model(dir, &config);
  EXPECT_TRUE(config.is_moe()) << name;
  LlamaOptions lo;
  lo.weight_dtype = DType::F32;
  LlamaModel model(config, *source, comm::Group(), lo);
  GenerateOptions go;
  go.max_tokens = steps;
  go.ignore_eos = true;
  go.collect_logits = true;
  GenerateResult ours = generate(model, comm::Group(), prompt, go);
  EXPECT_EQ(ours.tokens, ref["tokens"].get<std::vector<int32_t>>()) << name;
  const auto logits = ref["logits"].get<std::vector<std::vector<double>>>();
  EXPECT_EQ(ours.logits.size(), logits.size()) << name;
  if (ours.logits.size() != logits.size()) return 1e300;
  double worst = 0;
  for (size_t s = 0; s < logits.size(); ++s)
    worst = std::max(worst, normalised_error(ours.logits[s], logits[s]));
  std::printf("%s: max normalised logit error vs PyTorch (float64): %.3g\n", name, worst);
  return worst;
}

// The lines of `parallm generate` output that carry results: "[i] ..." token lines and, unless
// `tokens_only`, the "logits ..." lines (the summary lines name the layout, so they differ).
inline std::string generated_lines(const std::string& output, bool tokens_only = false) {
  std::string kept;
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);)
    if ((!tokens_only && line.rfind("logits", 0) == 0) ||
        (line.size() > 1 && line[0] == '[' && std::isdigit(static_cast<unsigned char>(line[1]))))
      kept += line + "\n";
  return kept;
}

}  // namespace parallm::testing
