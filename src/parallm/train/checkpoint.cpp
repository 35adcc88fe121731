#include "parallm/train/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/model/weights.h"
#include "parallm/train/model.h"

namespace fs = std::filesystem;

namespace parallm::train {
namespace {

const char* kExpAvg = "exp_avg.";
const char* kExpAvgSq = "exp_avg_sq.";

// A WeightSource that reads `prefix + name` from another: the optimizer file's "exp_avg.<tensor>"
// seen under the tensor's own name, so ParamStore::load reads each rank's slice of m or v.
class PrefixSource final : public WeightSource {
 public:
  PrefixSource(const WeightSource& inner, std::string prefix)
      : inner_(inner), prefix_(std::move(prefix)) {}
  bool has(const std::string& name) const override { return inner_.has(prefix_ + name); }
  TensorInfo info(const std::string& name) const override { return inner_.info(prefix_ + name); }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const std::string& n : inner_.names())
      if (n.rfind(prefix_, 0) == 0) out.push_back(n.substr(prefix_.size()));
    return out;
  }
  Tensor read(const std::string& name, DType dtype, Slice slice) const override {
    return inner_.read(prefix_ + name, dtype, slice);
  }
  uint64_t bytes_read() const override { return inner_.bytes_read(); }
  std::string describe() const override { return inner_.describe(); }

 private:
  const WeightSource& inner_;
  std::string prefix_;
};

// DIR without a trailing slash, so its parent and name are the directory's own.
fs::path clean_dir(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (p.has_filename()) return p;
  return p.parent_path();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) fail<std::runtime_error>("checkpoint", path.string(), ": cannot write");
}

// Puts the finished temporary directory at `target`, atomically where the kernel allows.
void swap_in(const fs::path& tmp, const fs::path& target) {
  if (!fs::exists(target)) {
    fs::rename(tmp, target);
    return;
  }
#ifdef RENAME_EXCHANGE
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(tmp);  // now the previous checkpoint
    return;
  }
#endif
  const fs::path old = tmp.string() + ".old";
  fs::remove_all(old);
  fs::rename(target, old);
  fs::rename(tmp, target);
  fs::remove_all(old);
}

}  // namespace

CheckpointInfo read_checkpoint_info(const std::string& dir) {
  const fs::path d = clean_dir(dir);
  if (!fs::is_directory(d)) fail("checkpoint", "--resume ", dir, ": not a directory");
  for (const char* f : {"config.json", "model.safetensors", "optimizer.safetensors",
                        "trainer_state.json"})
    if (!fs::exists(d / f))
      fail("checkpoint", "--resume ", dir, ": no ", f, " (not a parallm training checkpoint)");
  CheckpointInfo info;
  info.config = ModelConfig::from_file((d / "config.json").string());
  const std::string state_path = (d / "trainer_state.json").string();
  const nlohmann::json j = read_json_file(state_path, "checkpoint");
  if (!j.is_object() || !j.contains("format_version") || !j["format_version"].is_number_integer())
    fail("checkpoint", state_path, ": no integer format_version");
  if (j["format_version"].get<int64_t>() != kCheckpointFormat)
    fail("checkpoint", state_path, ": format_version ", j["format_version"].get<int64_t>(),
         " is not the supported ", kCheckpointFormat);
  if (!j.contains("step") || !j["step"].is_number_integer() || j["step"].get<int64_t>() < 0)
    fail("checkpoint", state_path, ": step must be a non-negative integer, got ",
         j.contains("step") ? json_preview(j["step"]) : "nothing");
  info.step = j["step"].get<int64_t>();
  if (j.contains("options") && j["options"].is_object()) info.options = j["options"];
  return info;
}

std::string config_difference(const ModelConfig& mine, const ModelConfig& theirs) {
  nlohmann::json a = mine.to_json(), b = theirs.to_json();
  a.erase("torch_dtype");
  b.erase("torch_dtype");
  std::set<std::string> keys;
  for (auto it = a.begin(); it != a.end(); ++it) keys.insert(it.key());
  for (auto it = b.begin(); it != b.end(); ++it) keys.insert(it.key());
  for (const std::string& k : keys) {
    const nlohmann::json va = a.contains(k) ? a[k] : nlohmann::json(), vb = b.contains(k) ? b[k] : nlohmann::json();
    if (va != vb) return cat(k, " is ", va.dump(), " here but ", vb.dump(), " in the checkpoint");
  }
  return "";
}

void check_save_target(const std::string& dir, const std::string& flag) {
  const fs::path d = clean_dir(dir);
  std::error_code ec;
  if (!fs::exists(d, ec)) {
    // The first ancestor that exists must be a directory, or the save at the end would fail.
    for (fs::path up = d.parent_path(); !up.empty(); up = up.parent_path()) {
      if (fs::exists(up, ec)) {
        if (!fs::is_directory(up, ec))
          fail("checkpoint", flag, " ", dir, ": ", up.string(), " is not a directory");
        break;
      }
      if (up == up.parent_path()) break;
    }
    return;
  }
  if (!fs::is_directory(d, ec)) fail("checkpoint", flag, " ", dir, ": exists and is not a directory");
  if (fs::is_empty(d, ec)) return;
  if (!fs::exists(d / "trainer_state.json", ec))
    fail("checkpoint", flag, " ", dir,
         ": exists and is not a parallm checkpoint (no trainer_state.json); refusing to replace it");
}

void save_checkpoint(const std::string& dir, const ModelConfig& config, ParamStore& params,
                     DataParallel& dp, const comm::Mesh& mesh, const CheckpointInfo& state,
                     const std::vector<std::string>& tokenizer_files) {
  // m and v whole over DP (ZeRO shards them), then every tensor whole over TP.
  std::vector<float> m_full(static_cast<size_t>(params.size())), v_full(m_full.size());
  dp.gather_state(m_full.data(), v_full.data());
  std::vector<std::pair<std::string, Tensor>> weights, optim;
  if (mesh.dp_rank() == 0) {
    weights = gather_full_tensors(params, mesh.tp(), false);
    ParamStore moments(config, mesh.tp_size(), mesh.tp_rank());
    std::copy(m_full.begin(), m_full.end(), moments.values());
    std::copy(v_full.begin(), v_full.end(), moments.grads());
    auto m = gather_full_tensors(moments, mesh.tp(), false);
    auto v = gather_full_tensors(moments, mesh.tp(), true);
    for (auto& [name, t] : m) optim.emplace_back(kExpAvg + name, std::move(t));
    for (auto& [name, t] : v) optim.emplace_back(kExpAvgSq + name, std::move(t));
  }
  m_full.clear();
  v_full.clear();
  if (mesh.world().rank() == 0) {
    const fs::path target = clean_dir(dir);
    check_save_target(dir, "--save");
    const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
    const fs::path tmp =
        parent / cat(".", target.filename().string(), ".tmp-", static_cast<long>(::getpid()));
    try {
      fs::create_directories(parent);
      fs::remove_all(tmp);
      fs::create_directories(tmp);
      ModelConfig out = config;
      out.torch_dtype = "float32";
      write_text(tmp / "config.json", out.to_json().dump(2) + "\n");
      write_safetensors((tmp / "model.safetensors").string(), weights, {{"format", "pt"}});
      write_safetensors((tmp / "optimizer.safetensors").string(), optim, {{"format", "pt"}});
      for (const std::string& f : tokenizer_files) {
        const std::string ext = fs::path(f).extension().string();
        fs::copy_file(f, tmp / (ext == ".json" ? "tokenizer.json" : "tokenizer.model"),
                      fs::copy_options::overwrite_existing);
      }
      nlohmann::json st;
      st["format_version"] = kCheckpointFormat;
      st["step"] = state.step;
      st["options"] = state.options.is_null() ? nlohmann::json::object() : state.options;
      st["written_by"] = "parallm train";
      write_text(tmp / "trainer_state.json", st.dump(2) + "\n");
      swap_in(tmp, target);
    } catch (const fs::filesystem_error& e) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
      fail<std::runtime_error>("checkpoint", "--save ", dir, ": ", e.what());
    } catch (...) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
      throw;
    }
  }
  mesh.world().barrier();  // nobody goes on (or ends the run) before the checkpoint is complete
}

void load_checkpoint(const std::string& dir, const ModelConfig& config, ParamStore& params,
                     DataParallel& dp, int tp, int tp_rank) {
  const fs::path d = clean_dir(dir);
  params.load(*open_safetensors((d / "model.safetensors").string()));
  const auto source = open_safetensors((d / "optimizer.safetensors").string());
  ParamStore moments(config, tp, tp_rank);
  moments.load(PrefixSource(*source, kExpAvg));
  std::vector<float> m_full(moments.values(), moments.values() + moments.size());
  moments.load(PrefixSource(*source, kExpAvgSq));
  dp.scatter_state(m_full.data(), moments.values());
}

}  // namespace parallm::train
