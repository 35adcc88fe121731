#include "parallm/train/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "parallm/comm/launch.h"
#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/model/llama_tensors.h"
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

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// One stage's share of a checkpoint, as TP rank 0 / DP rank 0 of the stage has it: the tensors
// it writes (its tied head copy left out) with their m and v, and which layers it holds.
struct StagePart {
  nlohmann::json meta;  // {"layers": [[begin, end], ...], "embedding": bool, "head": bool}
  NamedTensors weights, m, v;
};

// A StagePart as bytes for the PP gather: an 8-byte header length, the JSON header (names and
// shapes in order), then every tensor's floats back to back (weights, then m, then v).
std::string pack(const StagePart& part) {
  nlohmann::json h;
  h["meta"] = part.meta;
  h["tensors"] = nlohmann::json::array();
  int64_t floats = 0;
  for (const auto& [name, t] : part.weights) {
    h["tensors"].push_back({{"name", name}, {"shape", t.shape()}});
    floats += t.numel();
  }
  const std::string header = h.dump();
  const uint64_t hlen = header.size();
  std::string out(sizeof(hlen) + header.size() + 3 * static_cast<size_t>(floats) * 4, '\0');
  char* w = out.data();
  std::memcpy(w, &hlen, sizeof(hlen));
  w += sizeof(hlen);
  std::memcpy(w, header.data(), header.size());
  w += header.size();
  for (const NamedTensors* set : {&part.weights, &part.m, &part.v})
    for (const auto& [name, t] : *set) {
      const size_t n = static_cast<size_t>(t.numel()) * 4;
      std::memcpy(w, t.data<float>(), n);
      w += n;
    }
  return out;
}

StagePart unpack(const std::string& bytes, int stage) {
  auto broken = [&](const char* why) {
    fail<std::runtime_error>("checkpoint", "stage ", stage, " sent a malformed part (", why, ", ",
                             bytes.size(), " bytes)");
  };
  uint64_t hlen = 0;
  if (bytes.size() < sizeof(hlen)) broken("no header");
  std::memcpy(&hlen, bytes.data(), sizeof(hlen));
  if (hlen > bytes.size() - sizeof(hlen)) broken("header past the end");
  const nlohmann::json h = nlohmann::json::parse(bytes.substr(sizeof(hlen), hlen));
  StagePart part;
  part.meta = h.at("meta");
  size_t at = sizeof(hlen) + hlen;
  for (NamedTensors* set : {&part.weights, &part.m, &part.v})
    for (const nlohmann::json& t : h.at("tensors")) {
      Tensor full = Tensor::zeros(DType::F32, t.at("shape").get<Shape>());
      const size_t n = static_cast<size_t>(full.numel()) * 4;
      if (n > bytes.size() - at) broken("tensors past the end");
      std::memcpy(full.data<float>(), bytes.data() + at, n);
      at += n;
      set->emplace_back(t.at("name").get<std::string>(), std::move(full));
    }
  if (at != bytes.size()) broken("bytes left over");
  return part;
}

nlohmann::json stage_meta(const ParamStore& params) {
  const StageTensors& st = params.stage();
  nlohmann::json layers = nlohmann::json::array();
  if (st.layers.empty()) {
    layers.push_back({0, params.config().num_hidden_layers});
  } else {
    for (const pipeline::StageLayers& r : st.layers) layers.push_back({r.begin, r.end});
  }
  return {{"layers", layers}, {"embedding", st.embedding}, {"head", st.head}};
}

// Every stage's part in the model's checkpoint order, each tensor once; throws naming the tensor
// when a stage misses it or two stages both hold it (a mesh whose stages do not cover the model).
void consolidate(const ModelConfig& config, const std::vector<StagePart>& parts,
                 NamedTensors* weights, NamedTensors* optim) {
  const std::vector<LlamaTensor> table = llama_tensors(config);
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < table.size(); ++i) index[table[i].name] = i;
  std::vector<int> from(table.size(), -1);
  std::vector<const Tensor*> w(table.size()), m(table.size()), v(table.size());
  for (size_t s = 0; s < parts.size(); ++s) {
    const StagePart& part = parts[s];
    for (size_t k = 0; k < part.weights.size(); ++k) {
      const std::string& name = part.weights[k].first;
      const auto it = index.find(name);
      if (it == index.end())
        fail("checkpoint", "stage ", s, " holds \"", name, "\", which is not in the model");
      const size_t i = it->second;
      if (from[i] >= 0)
        fail("checkpoint", "tensor \"", name, "\" is held by stages ", from[i], " and ", s,
             " (the stages' tensors overlap)");
      if (part.weights[k].second.shape() != table[i].shape)
        fail("checkpoint", "stage ", s, " sent \"", name, "\" as ",
             shape_str(part.weights[k].second.shape()), ", the model's is ",
             shape_str(table[i].shape));
      from[i] = static_cast<int>(s);
      w[i] = &part.weights[k].second;
      m[i] = &part.m[k].second;
      v[i] = &part.v[k].second;
    }
  }
  for (size_t i = 0; i < table.size(); ++i) {
    if (from[i] < 0)
      fail("checkpoint", "no pipeline stage holds tensor \"", table[i].name,
           "\" (the stages do not cover the model)");
    weights->emplace_back(table[i].name, *w[i]);
  }
  for (size_t i = 0; i < table.size(); ++i) optim->emplace_back(kExpAvg + table[i].name, *m[i]);
  for (size_t i = 0; i < table.size(); ++i) optim->emplace_back(kExpAvgSq + table[i].name, *v[i]);
}

}  // namespace

CheckpointInfo read_checkpoint_info(const std::string& dir, const std::string& flag) {
  const fs::path d = clean_dir(dir);
  if (!fs::is_directory(d)) fail("checkpoint", flag, " ", dir, ": not a directory");
  for (const char* f :
       {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"})
    if (!fs::exists(d / f))
      fail("checkpoint", flag, " ", dir, ": no ", f, " (not a parallm training checkpoint)");
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
  if (j.contains("layout") && j["layout"].is_object()) info.layout = j["layout"];
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
    const nlohmann::json va = a.contains(k) ? a[k] : nlohmann::json(),
                         vb = b.contains(k) ? b[k] : nlohmann::json();
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
  if (!fs::is_directory(d, ec))
    fail("checkpoint", flag, " ", dir, ": exists and is not a directory");
  if (fs::is_empty(d, ec)) return;
  if (!fs::exists(d / "trainer_state.json", ec))
    fail(
        "checkpoint", flag, " ", dir,
        ": exists and is not a parallm checkpoint (no trainer_state.json); refusing to replace it");
}

void save_checkpoint(const std::string& dir, const ModelConfig& config, ParamStore& params,
                     DataParallel& dp, const comm::Mesh& mesh, const CheckpointInfo& state,
                     const std::vector<std::string>& tokenizer_files, DataParallel* experts) {
  if (params.tp() != mesh.tp_size() || params.tp_rank() != mesh.tp_rank())
    fail("checkpoint", "save: parameters laid out for TP rank ", params.tp_rank(), " of ",
         params.tp(), " on mesh TP rank ", mesh.tp_rank(), " of ", mesh.tp_size());
  // m and v whole over DP (ZeRO shards them; the DP collectives run on dp's communication
  // thread), then every tensor of this stage whole over TP on DP rank 0.
  std::vector<float> m_full(static_cast<size_t>(params.size())), v_full(m_full.size());
  dp.gather_state(m_full.data(), v_full.data());
  if (experts != nullptr) experts->gather_state(m_full.data(), v_full.data());
  // Under EP the first EP block (DP ranks [0, EP)) holds every expert once.
  const int ep = mesh.ep_size();
  StagePart mine;
  if (mesh.dp_rank() < ep) {
    NamedTensors w = gather_full_tensors(params, mesh.tp(), false);
    // m and v as the values and gradients of a store with the stage's layout, to gather them
    // the same way.
    ParamStore moments(params.config(), params.tp(), params.tp_rank(), params.stage(), params.ep(),
                       params.ep_rank());
    std::copy(m_full.begin(), m_full.end(), moments.values());
    std::copy(v_full.begin(), v_full.end(), moments.grads());
    NamedTensors m = gather_full_tensors(moments, mesh.tp(), false);
    NamedTensors v = gather_full_tensors(moments, mesh.tp(), true);
    // The tied head copy of the last stage is the first stage's embedding: written once, from
    // the first stage (its values and moments equal it when the trainer keeps them tied).
    // EP ranks past 0 send their experts only (EP rank 0 the rest).
    for (size_t i = 0; i < w.size(); ++i) {
      if (params.params()[i].tied_copy) continue;
      if (params.ep_rank() > 0 && !params.params()[i].expert) continue;
      mine.weights.push_back(std::move(w[i]));
      mine.m.push_back(std::move(m[i]));
      mine.v.push_back(std::move(v[i]));
    }
    if (params.ep_rank() == 0) mine.meta = stage_meta(params);
  }
  m_full = {};
  v_full = {};
  // Every stage's part to world rank 0 over the PP group of TP rank 0 / DP rank 0 (whose rank 0
  // is world rank 0: stage 0).
  NamedTensors weights, optim;
  nlohmann::json layout;
  if (mesh.tp_rank() == 0 && mesh.dp_rank() < ep) {
    std::vector<StagePart> parts;
    if (ep > 1) {  // PP 1: the EP ranks' experts to EP rank 0 (world rank 0)
      std::vector<std::string> all = comm::gather_strings(mesh.ep(), pack(mine));
      mine = {};
      for (size_t s = 0; s < all.size(); ++s) {
        parts.push_back(unpack(all[s], static_cast<int>(s)));
        all[s] = {};
      }
    } else if (mesh.pp_size() > 1) {
      std::vector<std::string> all = comm::gather_strings(mesh.pp(), pack(mine));
      mine = {};
      for (size_t s = 0; s < all.size(); ++s) {
        parts.push_back(unpack(all[s], static_cast<int>(s)));
        all[s] = {};
      }
    } else {
      parts.push_back(std::move(mine));
    }
    if (mesh.world().rank() == 0) {
      consolidate(config, parts, &weights, &optim);
      int virtual_stages = 1;
      nlohmann::json stage_layers = nlohmann::json::array();
      for (const StagePart& p : parts) {
        if (p.meta.is_null()) continue;  // an EP rank's experts
        virtual_stages = std::max(virtual_stages, static_cast<int>(p.meta["layers"].size()));
        stage_layers.push_back(p.meta["layers"]);
      }
      layout = {{"tp", mesh.tp_size()},
                {"pp", mesh.pp_size()},
                {"dp", mesh.dp_size() / mesh.ep_size()},
                {"ep", mesh.ep_size()},
                {"zero", dp.zero() ? 1 : 0},
                {"virtual_stages", virtual_stages},
                {"stage_layers", stage_layers}};
    }
  }
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
      st["layout"] = layout;
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
                     DataParallel& dp, int tp, int tp_rank, DataParallel* experts) {
  if (tp != params.tp() || tp_rank != params.tp_rank())
    fail("checkpoint", "load: TP rank ", tp_rank, " of ", tp,
         " given parameters laid out for TP rank ", params.tp_rank(), " of ", params.tp());
  const fs::path d = clean_dir(dir);
  // The stage's tensors by name: a tied head copy is "model.embed_tokens.weight" and reads the
  // embedding, and so do its m and v.
  params.load(*open_safetensors((d / "model.safetensors").string()));
  const auto source = open_safetensors((d / "optimizer.safetensors").string());
  ParamStore moments(config, tp, tp_rank, params.stage(), params.ep(), params.ep_rank());
  if (moments.size() != params.size())
    fail("checkpoint", "load: the optimizer layout holds ", moments.size(), " floats, the values ",
         params.size(), " (config differs from the parameters')");
  moments.load(PrefixSource(*source, kExpAvg));
  std::vector<float> m_full(moments.values(), moments.values() + moments.size());
  moments.load(PrefixSource(*source, kExpAvgSq));
  dp.scatter_state(m_full.data(), moments.values());
  if (experts != nullptr) experts->scatter_state(m_full.data(), moments.values());
}

}  // namespace parallm::train
