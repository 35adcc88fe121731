// Checkpoints across layouts: save_checkpoint at TP2 x PP2 x DP2 (ZeRO on and off, tied and
// untied embeddings) writes one consolidated directory, and load_checkpoint at TP1 x PP4 x DP2,
// TP4 x PP1 x DP1, 1 x 1 x 1, TP1 x PP3 (uneven), TP2 x PP3 x DP1 and PP2 with two virtual
// stages gives every rank the same values and AdamW moments bit for bit.
//
// Every value, m and v element is a number derived from (what, tensor name, index in the full
// tensor) alone, so every layout knows what each of its elements must be without talking to the
// others; the files are checked whole against the same numbers, and re-saving at the new layout
// must give the same files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "parallm/comm/launch.h"
#include "parallm/comm/mesh.h"
#include "parallm/model/llama_tensors.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/partition.h"
#include "parallm/train/checkpoint.h"
#include "parallm/train/dp.h"
#include "parallm/train/params.h"
#include "train_config.h"

namespace fs = std::filesystem;

namespace parallm::train {
namespace {

// 8 query heads over 2 KV heads (TP 4 replicates each KV head on 2 ranks), vocabulary 67 and FFN
// 100 (uneven at TP 3 and 4), 4 layers so PP 4 holds one each and PP 3 splits them 1, 2, 1.
ModelConfig model(bool tied) {
  ModelConfig c = testing::tiny_train_config_kv_replicated(tied);
  c.num_hidden_layers = 4;
  c.validate("checkpoint_reshard_test");
  return c;
}

enum What : uint64_t { kValue = 1, kM = 2, kV = 3, kJunk = 4 };

// The element `index` of the full tensor `name`: a float from a hash, distinct enough that a
// misplaced slice, a swapped m and v or a neighbouring tensor's value never matches.
float expected(What what, const std::string& name, int64_t index) {
  uint64_t h = 1469598103934665603ULL ^ (what * 0x9e3779b97f4a7c15ULL);
  for (char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ULL;
  h ^= static_cast<uint64_t>(index) + 0x632be59bd9b4e019ULL;
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
  h ^= h >> 31;
  const float u = static_cast<float>(h >> 40) * 0x1.0p-24f;  // [0, 1), 24 bits
  return what == kV ? u + 0.01f : u - 0.5f;                  // v >= 0 as Adam's is
}

// The index in the full tensor of local element j of the rank's slice `p`.
int64_t full_index(const Param& p, int64_t j) {
  switch (p.slice.kind) {
    case Slice::Kind::All:
      return j;
    case Slice::Kind::Rows:
      return p.slice.begin * (p.tensor.numel() / p.tensor.shape.at(0)) + j;
    case Slice::Kind::Cols: {
      const int64_t w = p.slice.end - p.slice.begin;
      return (j / w) * p.tensor.shape.at(1) + p.slice.begin + j % w;
    }
  }
  return -1;
}

// The parameter whose range of the flat buffer holds `offset`.
const Param& param_at(const ParamStore& params, int64_t offset) {
  for (const Param& p : params.params())
    if (offset >= p.offset && offset < p.offset + p.numel) return p;
  throw std::logic_error("no parameter at offset " + std::to_string(offset));
}

struct Layout {
  Layout(int tp_, int pp_, int dp_, bool zero_, int virtual_stages_ = 1,
         std::vector<int64_t> pp_layers_ = {})
      : tp(tp_),
        pp(pp_),
        dp(dp_),
        zero(zero_),
        virtual_stages(virtual_stages_),
        pp_layers(std::move(pp_layers_)) {}
  int tp, pp, dp;
  bool zero;
  int virtual_stages;
  std::vector<int64_t> pp_layers;  // explicit split (one count per virtual stage), else even
  std::string str() const {
    std::string s = "tp" + std::to_string(tp) + "_pp" + std::to_string(pp) + "_dp" +
                    std::to_string(dp) + (zero ? "_zero" : "");
    if (virtual_stages > 1) s += "_v" + std::to_string(virtual_stages);
    return s;
  }
};

// What stage `s` holds: Megatron's interleaving, virtual stage c * pp + s on stage s.
StageTensors stage_of(const ModelConfig& c, const Layout& l, int s) {
  StageTensors st;
  if (l.pp == 1 && l.virtual_stages == 1) return st;
  const auto parts =
      pipeline::partition_layers(c.num_hidden_layers, l.pp * l.virtual_stages, l.pp_layers);
  for (int chunk = 0; chunk < l.virtual_stages; ++chunk)
    st.layers.push_back(parts[chunk * l.pp + s]);
  st.embedding = s == 0;
  st.head = s == l.pp - 1;
  return st;
}

// Sets the rank's values and its owned m and v to the expected numbers; a tied head copy gets
// junk (save must write the first stage's embedding, never the copy).
void fill(ParamStore& params, DataParallel& dp) {
  for (const Param& p : params.params()) {
    float* dst = params.value(p);
    for (int64_t j = 0; j < p.numel; ++j)
      dst[j] = expected(p.tied_copy ? kJunk : kValue, p.tensor.name, full_index(p, j));
  }
  for (const OwnedSegment& s : dp.owned())
    for (int64_t off = s.begin; off < s.end; ++off) {
      const Param& p = param_at(params, off);
      const int64_t idx = full_index(p, off - p.offset);
      dp.m()[s.state + off - s.begin] = expected(p.tied_copy ? kJunk : kM, p.tensor.name, idx);
      dp.v()[s.state + off - s.begin] = expected(p.tied_copy ? kJunk : kV, p.tensor.name, idx);
    }
}

bool same_bits(float a, float b) {
  return std::memcmp(&a, &b, sizeof(float)) == 0;
}

// Elements of the rank's values, m and v that differ from the expected numbers (the tied copy
// must now hold the embedding); the first one described in `first`.
int64_t mismatches(const ParamStore& params, DataParallel& dp, std::string* first) {
  int64_t bad = 0;
  auto check = [&](float got, What what, const Param& p, int64_t j) {
    if (same_bits(got, expected(what, p.tensor.name, full_index(p, j)))) return;
    if (bad++ == 0)
      *first = p.tensor.name +
               (what == kValue ? " value"
                : what == kM   ? " m"
                               : " v") +
               "[" + std::to_string(full_index(p, j)) + "] = " + std::to_string(got);
  };
  for (const Param& p : params.params())
    for (int64_t j = 0; j < p.numel; ++j) check(params.value(p)[j], kValue, p, j);
  for (const OwnedSegment& s : dp.owned())
    for (int64_t off = s.begin; off < s.end; ++off) {
      const Param& p = param_at(params, off);
      check(dp.m()[s.state + off - s.begin], kM, p, off - p.offset);
      check(dp.v()[s.state + off - s.begin], kV, p, off - p.offset);
    }
  return bad;
}

struct RankCheck {
  std::mutex mu;
  int64_t bad = 0;
  std::string first;
  std::atomic<int64_t> owned_total{0};
  void add(int64_t n, const std::string& f, int rank) {
    std::lock_guard<std::mutex> lock(mu);
    if (n > 0 && bad == 0) first = "rank " + std::to_string(rank) + ": " + f;
    bad += n;
  }
};

// Runs one layout: every rank builds its stage's ParamStore and DataParallel (small buckets, so
// ZeRO cuts tensors across DP ranks mid-tensor), then either fills and saves, or loads (checks
// every element) and saves again to `resave`.
void run_layout(const ModelConfig& config, const Layout& l, const std::string& load_dir,
                const std::string& save_dir, RankCheck* check) {
  comm::launch(l.tp * l.pp * l.dp, {.backend = "local", .timeout_s = 60}, [&](comm::Group world) {
    comm::Mesh mesh(world, {l.tp, l.pp, l.dp, 1});
    ParamStore params(config, l.tp, mesh.tp_rank(), stage_of(config, l, mesh.pp_rank()));
    DataParallel dp(params.params(), params.size(), params.values(), params.grads(), mesh.dp(),
                    {2048, l.zero, true});
    if (load_dir.empty()) {
      fill(params, dp);
    } else {
      load_checkpoint(load_dir, config, params, dp, l.tp, mesh.tp_rank());
      std::string first;
      const int64_t bad = mismatches(params, dp, &first);
      check->add(bad, first, world.rank());
      check->owned_total += dp.state_size();
    }
    CheckpointInfo state;
    state.step = 7;
    state.options = {{"seed", 3}};
    save_checkpoint(save_dir, config, params, dp, mesh, state, {});
  });
}

// The files whole: every tensor of the model once (no lm_head when tied), each element the
// expected number.
void expect_files_hold_expected(const ModelConfig& config, const std::string& dir) {
  const auto model = open_safetensors(dir + "/model.safetensors");
  const auto optim = open_safetensors(dir + "/optimizer.safetensors");
  const std::vector<LlamaTensor> table = llama_tensors(config);
  EXPECT_EQ(model->names().size(), table.size());
  EXPECT_EQ(optim->names().size(), 2 * table.size());
  EXPECT_EQ(model->has("lm_head.weight"), !config.tie_word_embeddings);
  for (const LlamaTensor& t : table) {
    for (auto [what, src, prefix] :
         {std::tuple{kValue, model.get(), ""}, std::tuple{kM, optim.get(), "exp_avg."},
          std::tuple{kV, optim.get(), "exp_avg_sq."}}) {
      const Tensor full = src->read(prefix + t.name, DType::F32, Slice::all()).contiguous();
      ASSERT_EQ(full.shape(), t.shape) << prefix << t.name;
      int64_t bad = 0;
      for (int64_t i = 0; i < full.numel(); ++i)
        bad += !same_bits(full.data<float>()[i], expected(what, t.name, i));
      EXPECT_EQ(bad, 0) << dir << ": " << prefix << t.name << " differs in " << bad << " of "
                        << full.numel() << " elements";
    }
  }
}

class TmpDir {
 public:
  explicit TmpDir(const std::string& tag)
      : path_(fs::temp_directory_path() /
              ("parallm_reshard_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
  }
  ~TmpDir() { fs::remove_all(path_); }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

struct Case {
  bool tied, zero;
};

class Reshard : public ::testing::TestWithParam<Case> {};

TEST_P(Reshard, SaveAtTp2Pp2Dp2LoadsBitForBitAnywhere) {
  const Case c = GetParam();
  const ModelConfig config = model(c.tied);
  TmpDir tmp(std::string(c.tied ? "tied" : "untied") + (c.zero ? "_zero" : ""));
  const Layout source(2, 2, 2, c.zero);
  const std::string saved = tmp.sub("source");
  run_layout(config, source, "", saved, nullptr);
  expect_files_hold_expected(config, saved);
  const CheckpointInfo info = read_checkpoint_info(saved);
  EXPECT_EQ(info.step, 7);
  EXPECT_EQ(info.layout["tp"], 2);
  EXPECT_EQ(info.layout["pp"], 2);
  EXPECT_EQ(info.layout["dp"], 2);
  EXPECT_EQ(info.layout["zero"], c.zero ? 1 : 0);
  EXPECT_EQ(info.layout["stage_layers"].dump(), "[[[0,2]],[[2,4]]]");

  const std::vector<Layout> targets = {
      Layout(1, 4, 2, !c.zero),              // 8 ranks, one layer per stage
      Layout(4, 1, 1, false),                // TP 4 replicates the KV heads
      Layout(1, 1, 1, false),                // one rank
      Layout(1, 3, 1, false),                // uneven: 1, 2, 1 layers
      Layout(2, 3, 1, false, 1, {2, 1, 1}),  // explicit uneven split at TP 2
      Layout(1, 2, 2, true, 2),              // two virtual stages per stage, ZeRO
  };

  for (const Layout& l : targets) {
    SCOPED_TRACE(l.str());
    RankCheck check;
    const std::string resaved = tmp.sub(l.str());
    run_layout(config, l, saved, resaved, &check);
    EXPECT_EQ(check.bad, 0) << check.first;
    EXPECT_GT(check.owned_total.load(), 0);
    // Saved again from the new layout: the same consolidated checkpoint.
    expect_files_hold_expected(config, resaved);
    const CheckpointInfo again = read_checkpoint_info(resaved);
    EXPECT_EQ(again.layout["pp"], l.pp);
    EXPECT_EQ(again.layout["virtual_stages"], l.virtual_stages);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, Reshard,
                         ::testing::Values(Case{false, false}, Case{false, true}, Case{true, false},
                                           Case{true, true}),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return std::string(i.param.tied ? "Tied" : "Untied") +
                                  (i.param.zero ? "Zero" : "NoZero");
                         });

TEST(Reshard, LoadRefusesATpRankThatIsNotTheParameters) {
  const ModelConfig config = model(false);
  TmpDir tmp("tp_mismatch");
  run_layout(config, Layout(1, 1, 1, false), "", tmp.sub("c"), nullptr);
  ParamStore params(config, 2, 0);
  DataParallel dp(params.params(), params.size(), params.values(), params.grads(), comm::Group());
  EXPECT_THROW(load_checkpoint(tmp.sub("c"), config, params, dp, 1, 0), std::invalid_argument);
}

TEST(Reshard, LoadingNeedsNoLayoutRecord) {
  // A checkpoint without "layout" (as written before it existed) loads the same: the loader reads
  // tensors by name and never the record. Each TP rank of a PP 2 stage loads alone (no comm).
  const ModelConfig config = model(true);
  TmpDir tmp("no_layout");
  const std::string dir = tmp.sub("c");
  run_layout(config, Layout(1, 1, 1, false), "", dir, nullptr);
  const std::string state_path = dir + "/trainer_state.json";
  nlohmann::json st = nlohmann::json::parse(std::ifstream(state_path));
  ASSERT_TRUE(st.contains("layout"));
  st.erase("layout");
  std::ofstream(state_path) << st.dump();
  EXPECT_TRUE(read_checkpoint_info(dir).layout.is_null());
  const Layout l(2, 2, 1, false);
  for (int stage = 0; stage < 2; ++stage)
    for (int r = 0; r < 2; ++r) {
      ParamStore params(config, 2, r, stage_of(config, l, stage));
      DataParallel dp(params.params(), params.size(), params.values(), params.grads(),
                      comm::Group());
      load_checkpoint(dir, config, params, dp, 2, r);
      std::string first;
      EXPECT_EQ(mismatches(params, dp, &first), 0)
          << "stage " << stage << " rank " << r << ": " << first;
    }
}

TEST(Reshard, StagesThatOverlapAreRefusedNamingTheTensor) {
  // PP 2 where both stages hold the whole model: the save names the tensor two stages hold.
  const ModelConfig config = model(false);
  TmpDir tmp("overlap");
  try {
    comm::launch(2, {.backend = "local", .timeout_s = 30}, [&](comm::Group world) {
      comm::Mesh mesh(world, {1, 2, 1, 1});
      ParamStore params(config, 1, 0);
      DataParallel dp(params.params(), params.size(), params.values(), params.grads(), mesh.dp());
      save_checkpoint(tmp.sub("c"), config, params, dp, mesh, CheckpointInfo{}, {});
    });
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("model.embed_tokens.weight"), std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(tmp.sub("c")));
}

}  // namespace
}  // namespace parallm::train
