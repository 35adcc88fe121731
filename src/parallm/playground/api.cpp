// The playground's JSON API (api.h). Request fields are checked here for type (one line naming
// the field and what came); their values are checked by the CLI's own code, so the API refuses
// what the CLI refuses, with the same words.
#include "parallm/playground/api.h"

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "parallm/cli/plan.h"
#include "parallm/cli/schedule.h"
#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/parallel/shard.h"
#include "parallm/plan/comm_model.h"
#include "parallm/plan/hardware.h"
#include "parallm/plan/model_presets.h"
#include "parallm/plan/topology.h"

namespace parallm::playground {
namespace {

using nlohmann::json;

// Typed access to a request body's fields; every field read is remembered so that finish() can
// name one that nothing reads (a typo must not pass for a default).
class Fields {
 public:
  Fields(const json& body, std::string endpoint) : body_(body), endpoint_(std::move(endpoint)) {
    if (!body_.is_object())
      fail("playground", endpoint_, ": the body must be a JSON object, got ", json_preview(body_));
  }
  bool has(const char* k) {
    known_.insert(k);
    return body_.contains(k) && !body_.at(k).is_null();
  }
  int64_t integer(const char* k, int64_t def, int64_t lo = INT64_MIN, int64_t hi = INT64_MAX) {
    if (!has(k)) return def;
    const json& v = body_.at(k);
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX))
      fail("playground", endpoint_, ": ", k, " must be an integer, got ", json_preview(v));
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > hi)
      fail("playground", endpoint_, ": ", k, " must be in ", lo, "..", hi, ", got ", x);
    return x;
  }
  double number(const char* k, double def) {
    if (!has(k)) return def;
    const json& v = body_.at(k);
    if (!v.is_number())
      fail("playground", endpoint_, ": ", k, " must be a number, got ", json_preview(v));
    return v.get<double>();
  }
  std::string str(const char* k, std::string def = "") {
    if (!has(k)) return def;
    const json& v = body_.at(k);
    if (!v.is_string())
      fail("playground", endpoint_, ": ", k, " must be a string, got ", json_preview(v));
    return v.get<std::string>();
  }
  bool boolean(const char* k, bool def = false) {
    if (!has(k)) return def;
    const json& v = body_.at(k);
    if (!v.is_boolean())
      fail("playground", endpoint_, ": ", k, " must be true or false, got ", json_preview(v));
    return v.get<bool>();
  }
  std::vector<double> numbers(const char* k) {
    std::vector<double> out;
    if (!has(k)) return out;
    const json& v = body_.at(k);
    if (!v.is_array())
      fail("playground", endpoint_, ": ", k, " must be an array of numbers, got ", json_preview(v));
    for (size_t i = 0; i < v.size(); ++i) {
      if (!v[i].is_number())
        fail("playground", endpoint_, ": ", json_path(k, size_t(i)), " must be a number, got ",
             json_preview(v[i]));
      out.push_back(v[i].get<double>());
    }
    return out;
  }
  // Text or a JSON value given as text (a pasted config.json may arrive either way).
  std::string text_or_json(const char* k) {
    if (!has(k)) return "";
    const json& v = body_.at(k);
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object()) return v.dump();
    fail("playground", endpoint_, ": ", k, " must be a string or an object, got ", json_preview(v));
  }
  void finish() const {
    for (const auto& [k, v] : body_.items())
      if (!known_.count(k))
        fail("playground", endpoint_, ": unknown field \"", k, "\" (known: ", join(known_, ", "),
             ")");
  }
  bool present(const std::string& k) const { return body_.contains(k) && !body_.at(k).is_null(); }

 private:
  const json& body_;
  std::string endpoint_;
  std::set<std::string> known_;
};

// A private directory for pasted files (config.json, a topology), removed with what it holds;
// messages that name its files are rewritten to name the field instead.
class PasteDir {
 public:
  PasteDir() = default;
  ~PasteDir() {
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }
  PasteDir(const PasteDir&) = delete;
  PasteDir& operator=(const PasteDir&) = delete;

  std::string write(const std::string& name, const std::string& text, const std::string& label) {
    if (dir_.empty()) {
      std::string tmpl = (std::filesystem::temp_directory_path() / "parallm-playground-XXXXXX");
      if (!mkdtemp(tmpl.data()))
        fail<std::runtime_error>("playground", "cannot make a temporary directory for ", label);
      dir_ = tmpl;
    }
    const std::string path = dir_ + "/" + name;
    std::ofstream out(path, std::ios::binary);
    out << text;
    if (!out) fail<std::runtime_error>("playground", "cannot write ", path);
    labels_.emplace_back(path, label);
    return path;
  }
  std::string rewrite(std::string s) const {
    for (const auto& [path, label] : labels_)
      for (size_t at; (at = s.find(path)) != std::string::npos;) s.replace(at, path.size(), label);
    if (!dir_.empty())
      for (size_t at; (at = s.find(dir_)) != std::string::npos;)
        s.replace(at, dir_.size(), "pasted");
    return s;
  }

 private:
  std::string dir_;
  std::vector<std::pair<std::string, std::string>> labels_;
};

// Runs fn; an invalid_argument leaves with the paste directory's paths replaced by field names.
template <class Fn>
auto with_paste_names(const PasteDir& paste, Fn fn) {
  try {
    return fn();
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(paste.rewrite(e.what()));
  }
}

// "model" (a preset) or "config" (pasted config.json): the CLI's --model.
std::string model_spec(Fields& f, PasteDir& paste, const char* endpoint) {
  const std::string config = f.text_or_json("config");
  const std::string model = f.str("model");
  if (!config.empty() && !model.empty())
    fail("playground", endpoint, ": give model (a preset) or config (a config.json), not both");
  if (!config.empty()) {
    if (config.size() > kMaxJsonFileBytes)
      fail("playground", endpoint, ": config is larger than ", kMaxJsonFileBytes, " bytes");
    return paste.write("config.json", config, "config (pasted config.json)");
  }
  if (model.empty() && f.present("model"))
    fail("playground", endpoint, ": model must not be empty");
  return model;
}

std::string action_type(const pipeline::Action& a) {
  using pipeline::ActionKind;
  switch (a.kind) {
    case ActionKind::Forward:
      return "F";
    case ActionKind::Backward:
    case ActionKind::BackwardInput:
      return "B";
    case ActionKind::BackwardWeight:
      return "W";
    default:
      return "";
  }
}

std::string in_flight_formula_text(pipeline::ScheduleKind kind, bool forward_only) {
  using pipeline::ScheduleKind;
  if (forward_only) return "forward-only: 1";
  switch (kind) {
    case ScheduleKind::GPipe:
      return "GPipe: m (every forward before any backward)";
    case ScheduleKind::OneFOneB:
      return "1F1B: min(p - r, m) on stage r";
    case ScheduleKind::Interleaved:
      return "interleaved: min(m v, 2 (p - r - 1) + (v - 1) p + 1) / v on stage r";
    case ScheduleKind::ZeroBubbleH1:
      return "zb-h1: min(p, m) (activations held until W)";
  }
  return "";
}

}  // namespace

json api_plan(const json& body) {
  Fields f(body, "/api/plan");
  cli::PlanOptions o;
  PasteDir paste;
  o.model = model_spec(f, paste, "/api/plan");
  o.cluster.gpu = f.str("gpu");
  const std::string topology = f.str("topology");
  if (f.present("topology")) {
    if (topology.size() > plan::kMaxTopologyFileBytes)
      fail("playground", "/api/plan: topology is larger than ", plan::kMaxTopologyFileBytes,
           " bytes");
    o.cluster.topology_file = paste.write("topology.txt", topology, "topology (pasted)");
  }
  o.cluster.link = f.str("link");
  o.cluster.inter_node = f.str("inter_node");
  o.gpus = f.integer("gpus", 0);
  o.nodes = f.integer("nodes", 0);
  o.gpus_per_node = f.integer("gpus_per_node", 0);
  o.tp = f.integer("tp", 0);
  o.pp = f.integer("pp", 0);
  o.dp = f.integer("dp", 0);
  o.ep = f.integer("ep", 0);
  o.tp_anywhere = f.boolean("tp_anywhere");
  o.batch = f.integer("batch", o.batch);
  o.prompt_len = f.integer("prompt_len", o.prompt_len);
  o.output_len = f.integer("output_len", o.output_len);
  o.dtype = f.str("dtype", o.dtype);
  o.kv_dtype = f.str("kv_dtype");
  o.act_dtype = f.str("act_dtype");
  o.goal = f.str("goal", o.goal);
  o.mem_bw_gbps = f.number("mem_bw", 0);
  o.rank_mem_bw_gbps = f.number("rank_mem_bw", 0);
  o.gflops = f.number("flops", 0);
  o.threads = f.integer("threads", 0);
  o.train = f.boolean("train");
  o.global_batch = f.integer("global_batch", o.global_batch);
  o.micro_batch = f.integer("micro_batch", o.micro_batch);
  o.seq_len = f.integer("seq_len", o.seq_len);
  o.optimizer = f.str("optimizer", o.optimizer);
  o.recompute = f.str("recompute", o.recompute);
  o.no_sp = f.boolean("no_sp");
  o.sp = f.boolean("sp");
  o.zero = int(f.integer("zero", 0, INT_MIN, INT_MAX));
  o.schedule = f.str("schedule", o.schedule);
  o.chunks = int(f.integer("chunks", 1, INT_MIN, INT_MAX));
  f.finish();
  // The CLI asks which flags were given: here, which fields ("--prompt-len" is "prompt_len").
  o.given = [&f, &o](const char* flag) {
    std::string k = flag;
    if (k.rfind("--", 0) == 0) k = k.substr(2);
    std::replace(k.begin(), k.end(), '-', '_');
    if (k == "model") return !o.model.empty();
    if (k == "topology") return !o.cluster.topology_file.empty();
    return f.present(k);
  };
  json out = with_paste_names(paste, [&] { return cli::plan_json(o); });
  const std::string text = out.dump();
  const std::string named = paste.rewrite(text);
  return named == text ? out : json::parse(named);
}

json api_schedule(const json& body) {
  Fields f(body, "/api/schedule");
  cli::ScheduleOptions o;
  o.pp = int(f.integer("p", o.pp, INT_MIN, INT_MAX));
  o.micro_batches = int(f.integer("m", o.micro_batches, INT_MIN, INT_MAX));
  o.chunks = int(f.integer("v", o.chunks, INT_MIN, INT_MAX));
  o.schedule = f.str("schedule", o.schedule);
  o.forward = f.number("forward", o.forward);
  o.backward = f.number("backward", o.backward);
  o.weight = f.number("weight", o.weight);
  o.p2p = f.number("p2p", o.p2p);
  o.forward_only = f.boolean("forward_only");
  o.stage_forward = f.numbers("stage_forward");
  o.stage_backward = f.numbers("stage_backward");
  o.stage_weight = f.numbers("stage_weight");
  // The model's layers, when the page knows them: each of the p x v model chunks needs one.
  const int64_t layers = f.integer("layers", 0);
  f.finish();
  if (f.present("layers")) {
    if (layers < 1) fail("playground", "/api/schedule: layers must be >= 1, got ", layers);
    if (int64_t(o.pp) * o.chunks > layers)
      fail("playground", "/api/schedule: p ", o.pp, " x v ", o.chunks, " = ",
           int64_t(o.pp) * o.chunks, " pipeline chunks, more than the model's ", layers,
           " layers (each chunk needs one)");
  }
  // The answer lists every action: beyond this the page draws nothing anyone reads, and the JSON
  // would run to hundreds of MB (`parallm schedule` takes up to 2^22).
  const int64_t cells = int64_t(o.pp) * o.micro_batches * o.chunks;
  if (o.pp > 0 && o.micro_batches > 0 && o.chunks > 0 && cells > kMaxScheduleCells)
    fail("playground", "/api/schedule: p ", o.pp, " x m ", o.micro_batches, " x v ", o.chunks,
         " = ", cells, " is more than the ", kMaxScheduleCells,
         " the playground draws; `parallm schedule` simulates up to ", int64_t(1) << 22);
  const cli::ScheduleRun run = cli::run_schedule(o);
  const pipeline::Schedule& s = run.schedule;
  const pipeline::SimResult& r = run.result;
  json stages = json::array();
  for (int st = 0; st < s.stages; ++st) {
    json actions = json::array(), idle = json::array();
    double at = 0;  // idle gaps: before, between and after the stage's actions
    for (const pipeline::Interval& iv : r.timeline[st]) {
      if (iv.start > at) idle.push_back({at, iv.start});
      at = std::max(at, iv.end);
    }
    if (r.makespan > at) idle.push_back({at, r.makespan});
    for (const pipeline::Interval& iv : r.timeline[st])
      actions.push_back({{"label", pipeline::to_string(iv.action)},
                         {"type", action_type(iv.action)},
                         {"micro_batch", iv.action.micro_batch},
                         {"chunk", iv.action.chunk},
                         {"start", iv.start},
                         {"end", iv.end}});
    stages.push_back({{"stage", st},
                      {"busy", r.busy[st]},
                      {"idle", r.idle[st]},
                      {"idle_spans", std::move(idle)},
                      {"peak_in_flight", r.peak_in_flight[st]},
                      {"peak_in_flight_formula",
                       pipeline::peak_in_flight_formula(run.kind, o.pp, o.micro_batches, s.chunks,
                                                        st, o.forward_only)},
                      {"actions", std::move(actions)}});
  }
  json out = {{"name", s.name()},
              {"schedule", std::string(pipeline::schedule_kind_name(run.kind))},
              {"p", o.pp},
              {"m", o.micro_batches},
              {"v", s.chunks},
              {"forward_only", o.forward_only},
              {"split_backward", s.split_backward()},
              {"forward_time", run.sim.forward_time},
              {"backward_time", run.sim.backward_time},
              {"weight_time", s.split_backward() ? run.sim.weight(0) : 0.0},
              {"p2p_time", run.sim.p2p_time},
              {"per_stage_times", run.per_stage},
              {"makespan", r.makespan},
              {"bubble_fraction", r.bubble_fraction},
              {"formula_bubble", run.formula},
              {"formula_text", cli::bubble_formula_note(o, run)},
              {"in_flight_formula_text", in_flight_formula_text(run.kind, o.forward_only)},
              {"stages", std::move(stages)}};
  return out;
}

json api_trace(const json& body) {
  const json* events = &body;
  if (body.is_object()) {
    if (!body.contains("traceEvents"))
      fail("playground",
           "/api/trace: a trace is an array of events or an object with "
           "\"traceEvents\"; this object has no \"traceEvents\"");
    events = &body.at("traceEvents");
  }
  if (!events->is_array())
    fail("playground", "/api/trace: the trace events must be an array, got ",
         json_preview(*events));
  struct Span {
    std::string name, cat;
    double start, end;
  };
  std::map<int64_t, std::vector<Span>> ranks;
  std::map<int64_t, std::string> rank_names;
  size_t count = 0;
  for (size_t i = 0; i < events->size(); ++i) {
    const json& e = (*events)[i];
    const std::string where = json_path("traceEvents", i);
    if (!e.is_object())
      fail("playground", "/api/trace: ", where, " must be an object, got ", json_preview(e));
    const auto ph = e.find("ph");
    if (ph == e.end() || !ph->is_string()) continue;
    const auto pid = e.find("pid");
    if (pid == e.end() || !pid->is_number_integer())
      fail("playground", "/api/trace: ", json_path(where, "pid"),
           " must be an integer (the rank), got ",
           pid == e.end() ? std::string("nothing") : json_preview(*pid));
    const int64_t rank = pid->get<int64_t>();
    if (*ph == "M") {
      const auto name = e.find("name");
      if (name != e.end() && *name == "process_name" && e.contains("args") &&
          e["args"].is_object() && e["args"].contains("name") && e["args"]["name"].is_string())
        rank_names[rank] = e["args"]["name"].get<std::string>();
      continue;
    }
    if (*ph != "X") continue;
    for (const char* k : {"ts", "dur"}) {
      const auto v = e.find(k);
      if (v == e.end() || !v->is_number() || !std::isfinite(v->get<double>()) ||
          (std::string(k) == "dur" && v->get<double>() < 0))
        fail("playground", "/api/trace: ", json_path(where, k),
             " must be a finite number (microseconds)", std::string(k) == "dur" ? " >= 0" : "",
             ", got ", v == e.end() ? std::string("nothing") : json_preview(*v));
    }
    if (++count > kMaxTraceSpans)
      fail("playground", "/api/trace: more than ", kMaxTraceSpans, " spans");
    std::string text[2];
    for (int t = 0; t < 2; ++t) {
      const char* k = t == 0 ? "name" : "cat";
      const auto v = e.find(k);
      if (v == e.end() || v->is_null()) continue;
      if (!v->is_string())
        fail("playground", "/api/trace: ", json_path(where, k), " must be a string, got ",
             json_preview(*v));
      text[t] = v->get<std::string>();
    }
    const double ts = e["ts"].get<double>(), dur = e["dur"].get<double>();
    ranks[rank].push_back({std::move(text[0]), std::move(text[1]), ts, ts + dur});
  }
  if (ranks.empty())
    fail("playground",
         "/api/trace: no complete spans (\"ph\": \"X\"); is this a file written by "
         "`parallm generate --trace` or `parallm train --trace`?");
  // The schedule's own actions ("F3", "B3", "W3", "F3.1"), as scripts/trace-timeline.py reads them.
  static const std::regex action_re(R"(^([FBW])(\d+)(?:\.(\d+))?$)");
  struct Act {
    char type;
    int mb, chunk;
    double start, end;
  };
  std::map<int64_t, std::vector<Act>> acts;
  bool has_w = false, has_b = false;
  int max_chunk = 0;
  for (auto& [rank, spans] : ranks) {
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.start < b.start; });
    for (const Span& sp : spans) {
      std::smatch m;
      if (sp.cat != "compute" || !std::regex_match(sp.name, m, action_re)) continue;
      const int chunk = m[3].matched ? std::stoi(m[3].str()) : 0;
      acts[rank].push_back({sp.name[0], std::stoi(m[2].str()), chunk, sp.start, sp.end});
      has_w |= sp.name[0] == 'W';
      has_b |= sp.name[0] != 'F';
      max_chunk = std::max(max_chunk, chunk);
    }
  }
  bool pipeline_trace = !acts.empty();
  json out;
  out["ranks_count"] = ranks.size();
  double t0 = INFINITY, t1 = -INFINITY;
  for (const auto& [rank, spans] : ranks)
    for (const Span& sp : spans) t0 = std::min(t0, sp.start), t1 = std::max(t1, sp.end);
  double w0 = t0, w1 = t1;  // the window the bubble is measured over
  int steps = 1, m = 0;
  if (pipeline_trace) {
    // Each step starts with micro-batch 0's first forward on the first stage.
    const auto& first = acts.begin()->second;
    steps = int(std::count_if(first.begin(), first.end(), [](const Act& a) {
      return a.type == 'F' && a.mb == 0 && a.chunk == 0;
    }));
    steps = std::max(steps, 1);
    for (auto& [rank, list] : acts)
      if (list.size() % steps != 0) steps = 1;  // not whole steps: measure them all
    w0 = INFINITY, w1 = -INFINITY;
    std::set<int> mbs;
    for (auto& [rank, list] : acts) {
      list.erase(list.begin(), list.end() - list.size() / steps);  // the last step
      for (const Act& a : list) {
        w0 = std::min(w0, a.start), w1 = std::max(w1, a.end);
        mbs.insert(a.mb);
      }
    }
    m = int(mbs.size());
  }
  // Pipeline stages: the ranks of one TP group (one stage) start their first action of the step
  // together, before any of them ends it; the next stage starts only after it ended (it waits for
  // the activation). So ranks sorted by that start split into stages where one starts at or
  // after the previous stage's first action ended.
  std::map<int64_t, int> stage_of;
  int stages = 0;
  if (pipeline_trace) {
    std::vector<std::pair<const Act*, int64_t>> firsts;
    for (const auto& [rank, list] : acts)
      if (!list.empty()) firsts.push_back({&list.front(), rank});
    std::sort(firsts.begin(), firsts.end(),
              [](const auto& a, const auto& b) { return a.first->start < b.first->start; });
    double stage_end = -INFINITY;
    for (const auto& [a, rank] : firsts) {
      if (a->start >= stage_end) ++stages, stage_end = a->end;
      stage_end = std::min(stage_end, a->end);
      stage_of[rank] = stages - 1;
    }
    // One stage (TP or DP ranks only, e.g. generate --tp 2): no pipeline to compare.
    if (stages < 2) pipeline_trace = false, w0 = t0, w1 = t1;
  }
  out["pipeline"] = pipeline_trace;
  std::vector<double> st_f(stages, 0), st_b(stages, 0), st_w(stages, 0), st_n(stages, 0);
  const double window = std::max(w1 - w0, 1e-9);
  json rank_list = json::array();
  double busy_all = 0;
  json stage_forward = json::array(), stage_backward = json::array(), stage_weight = json::array();
  for (const auto& [rank, spans] : ranks) {
    json js = json::array();
    for (const Span& sp : spans)
      js.push_back(
          {{"name", sp.name}, {"cat", sp.cat}, {"start", sp.start - w0}, {"end", sp.end - w0}});
    double busy = 0;
    json actions = json::array();
    if (pipeline_trace) {
      double f = 0, b = 0, w = 0;
      int nf = 0, nb = 0, nw = 0;
      for (const Act& a : acts[rank]) {
        busy += a.end - a.start;
        const double d = a.end - a.start;
        if (a.type == 'F') f += d, ++nf;
        if (a.type == 'B') b += d, ++nb;
        if (a.type == 'W') w += d, ++nw;
        actions.push_back(
            {{"type", std::string(1, a.type)},
             {"label", cat(a.type, a.mb, a.chunk || max_chunk ? cat(".", a.chunk) : std::string())},
             {"micro_batch", a.mb},
             {"chunk", a.chunk},
             {"start", a.start - w0},
             {"end", a.end - w0}});
      }
      // Whole-stage times per micro-batch (all chunks), in the simulator's sense, averaged over
      // the stage's ranks below.
      const double per = double(std::max(m, 1));
      const int st = stage_of[rank];
      st_f[st] += f / per, st_b[st] += (b + w) / per, st_w[st] += w / per, st_n[st] += 1;
      (void)nf, (void)nb, (void)nw;
    } else {
      // Compute time: the union of compute spans (layer spans nest inside larger ones).
      double cur_s = 0, cur_e = -INFINITY;
      for (const Span& sp : spans) {
        if (sp.cat != "compute") continue;
        if (sp.start > cur_e) {
          if (cur_e > cur_s) busy += cur_e - cur_s;
          cur_s = sp.start, cur_e = sp.end;
        } else {
          cur_e = std::max(cur_e, sp.end);
        }
      }
      if (cur_e > cur_s) busy += cur_e - cur_s;
    }
    busy_all += busy;
    json jr = {{"rank", rank},
               {"name", rank_names.count(rank) ? rank_names[rank] : cat("rank ", rank)},
               {"busy_us", busy},
               {"idle_us", window - busy},
               {"bubble", 1 - busy / window},
               {"spans", std::move(js)}};
    if (pipeline_trace) jr["actions"] = std::move(actions);
    rank_list.push_back(std::move(jr));
  }
  out["window_us"] = window;
  out["measured_bubble"] = 1 - busy_all / (double(ranks.size()) * window);
  out["bubble_measured_over"] =
      pipeline_trace ? "F/B/W actions of the last step" : "compute spans of the whole trace";
  out["ranks"] = std::move(rank_list);
  if (pipeline_trace) {
    for (int st = 0; st < stages; ++st) {
      const double n = std::max(st_n[st], 1.0);
      stage_forward.push_back(st_f[st] / n);
      stage_backward.push_back(st_b[st] / n);
      stage_weight.push_back(st_w[st] / n);
    }
    out["steps"] = steps;
    out["stages"] = stages;
    json stage_list = json::array();
    for (const auto& [rank, st] : stage_of) stage_list.push_back({{"rank", rank}, {"stage", st}});
    out["rank_stages"] = std::move(stage_list);
    // What to simulate beside it: the measured per-stage times replayed (api_schedule's fields).
    if (!has_b) {  // generate --pp: forwards only, in GPipe order
      out["simulate"] = {{"p", stages},
                         {"m", m},
                         {"schedule", "gpipe"},
                         {"forward_only", true},
                         {"stage_forward", stage_forward}};
    } else {
      out["simulate"] = {{"p", stages},
                         {"m", m},
                         {"v", max_chunk + 1},
                         {"schedule", has_w           ? "zb-h1"
                                      : max_chunk > 0 ? "interleaved"
                                                      : "1f1b"},
                         {"stage_forward", stage_forward},
                         {"stage_backward", stage_backward}};
    }
    if (has_w) out["simulate"]["stage_weight"] = stage_weight;
  }
  return out;
}

json api_layer_split(const json& body) {
  Fields f(body, "/api/layer-split");
  PasteDir paste;
  const std::string spec = model_spec(f, paste, "/api/layer-split");
  const int tp = int(f.integer("tp", 1, 1, 4096));
  const std::string dtype = f.str("dtype", "fp16");
  const std::string link_name = f.str("link", "nvlink4");
  f.finish();
  if (spec.empty()) fail("playground", "/api/layer-split: model (a preset) or config is required");
  std::string name;
  const ModelConfig c = with_paste_names(paste, [&] { return plan::resolve_model(spec, &name); });
  name = paste.rewrite(name);
  const plan::Precision act = plan::parse_precision(dtype, "dtype");
  const double ab = plan::precision_bytes(act);
  const plan::LinkSpec link = plan::link_preset(link_name);
  if (!parallel::HeadPlan::fits(c.num_attention_heads, c.num_key_value_heads, tp))
    fail("playground", "/api/layer-split: tp ", tp, " does not split ", c.num_attention_heads,
         " query heads and ", c.num_key_value_heads, " KV heads; sizes that do: ",
         parallel::HeadPlan::valid_sizes(c.num_attention_heads, c.num_key_value_heads));
  const int64_t h = c.hidden_size, hd = c.head_dim,
                ffn = c.is_moe() ? c.expert_ffn() : c.intermediate_size;
  json ranks = json::array();
  for (int r = 0; r < tp; ++r) {
    const parallel::HeadPlan hp =
        parallel::HeadPlan::make(c.num_attention_heads, c.num_key_value_heads, tp, r);
    const parallel::ShardSpec q = hp.q_rows(hd), kv = hp.kv_rows(hd),
                              f_rows = parallel::ShardSpec::even(ffn, tp, r),
                              vocab = parallel::ShardSpec::even(c.vocab_size, tp, r);
    auto shard = [](const char* n, int64_t rows, int64_t cols, int64_t full_rows, int64_t full_cols,
                    const char* split, std::string note = "") {
      return json{{"name", n},
                  {"shape", {rows, cols}},
                  {"full", {full_rows, full_cols}},
                  {"split", split},
                  {"note", note}};
    };
    json shards = json::array();
    shards.push_back(shard("embed_tokens", vocab.size(), h, c.vocab_size, h, "rows (vocabulary)",
                           cat("tokens ", vocab.begin, "..", vocab.end - 1)));
    shards.push_back(shard("q_proj", q.size(), h, c.q_dim(), h, "rows (query heads)",
                           cat("heads ", hp.q_begin, "..", hp.q_begin + hp.q_heads - 1)));
    const std::string kv_note =
        cat("KV heads ", hp.kv_begin, "..", hp.kv_begin + hp.kv_heads - 1,
            hp.kv_replicas > 1 ? cat(", replicated on ", hp.kv_replicas, " ranks") : std::string());
    shards.push_back(shard("k_proj", kv.size(), h, c.kv_dim(), h, "rows (KV heads)", kv_note));
    shards.push_back(shard("v_proj", kv.size(), h, c.kv_dim(), h, "rows (KV heads)", kv_note));
    shards.push_back(shard("o_proj", h, q.size(), h, c.q_dim(), "columns (query heads)",
                           "row-parallel: partial sums, then all-reduce"));
    const std::string moe = c.is_moe() ? cat("each of ", c.num_local_experts, " experts") : "";
    shards.push_back(shard("gate_proj", f_rows.size(), h, ffn, h, "rows (FFN)", moe));
    shards.push_back(shard("up_proj", f_rows.size(), h, ffn, h, "rows (FFN)", moe));
    shards.push_back(shard("down_proj", h, f_rows.size(), h, ffn, "columns (FFN)",
                           "row-parallel: partial sums, then all-reduce"));
    shards.push_back(shard("input_layernorm", h, 1, h, 1, "replicated"));
    shards.push_back(shard("post_attention_layernorm", h, 1, h, 1, "replicated"));
    shards.push_back(shard("norm", h, 1, h, 1, "replicated"));
    shards.push_back(shard("lm_head", vocab.size(), h, c.vocab_size, h, "rows (vocabulary)",
                           c.tie_word_embeddings ? "tied to embed_tokens" : ""));
    ranks.push_back({{"rank", r}, {"shards", std::move(shards)}});
  }
  // One decoded token (one sequence): the collectives the engine runs, as the planner counts them.
  json colls = json::array();
  double sent = 0;
  auto add = [&](const char* what, const char* where, int64_t count, plan::Collective kind,
                 double bytes) {
    const plan::CommCost cost = plan::collective_cost(kind, bytes, tp, link);
    colls.push_back({{"name", what},
                     {"where", where},
                     {"collective", std::string(plan::collective_name(kind))},
                     {"count", count},
                     {"bytes", bytes},
                     {"algorithm", cost.algorithm},
                     {"bytes_sent_per_call", cost.bytes_sent},
                     {"bytes_sent", cost.bytes_sent * double(count)}});
    sent += cost.bytes_sent * double(count);
  };
  if (tp > 1) {
    add("attention all-reduce", "after o_proj, every layer", c.num_hidden_layers,
        plan::Collective::AllReduce, double(h) * ab);
    add("MLP all-reduce", "after down_proj, every layer", c.num_hidden_layers,
        plan::Collective::AllReduce, double(h) * ab);
    add("embedding all-reduce", "after the vocab-parallel lookup", 1, plan::Collective::AllReduce,
        double(h) * ab);
    add("sampler all-gather", "each rank's best (value, id); the logits never travel", 1,
        plan::Collective::AllGather, 2.0 * 4 * tp);
  }
  return {
      {"model", name},
      {"tp", tp},
      {"dtype", std::string(plan::precision_name(act))},
      {"link", link.name},
      {"hidden", h},
      {"layers", c.num_hidden_layers},
      {"heads", c.num_attention_heads},
      {"kv_heads", c.num_key_value_heads},
      {"head_dim", hd},
      {"ffn", ffn},
      {"vocab", c.vocab_size},
      {"experts", c.num_local_experts},
      {"valid_tp", parallel::HeadPlan::valid_sizes(c.num_attention_heads, c.num_key_value_heads)},
      {"ranks", std::move(ranks)},
      {"collectives", std::move(colls)},
      {"bytes_sent_per_token", sent}};
}

json api_presets() {
  json models = json::array();
  for (const auto& p : plan::model_presets())
    models.push_back({{"name", p.name},
                      {"params", p.config.param_count()},
                      {"layers", p.config.num_hidden_layers},
                      {"heads", p.config.num_attention_heads},
                      {"kv_heads", p.config.num_key_value_heads}});
  json devices = json::array();
  for (const auto& n : plan::device_preset_names()) devices.push_back(n);
  json links = json::array();
  for (const auto& n : plan::link_preset_names()) links.push_back(n);
  return {{"models", models},
          {"devices", devices},
          {"links", links},
          {"schedules", {"gpipe", "1f1b", "interleaved", "zb-h1"}}};
}

}  // namespace parallm::playground
