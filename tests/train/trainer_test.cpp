// The training loop end to end on a tiny model (f32): every TP x DP layout (ZeRO-1 included)
// gives the losses of one rank, resume continues bit for bit, checkpoints load into generate,
// ZeRO-1's optimizer memory per rank, and bad input refused in one line with nothing written.
#include "parallm/train/trainer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "parallm/core/error.h"
#include "parallm/train/checkpoint.h"
#include "train/train_config.h"

namespace fs = std::filesystem;

namespace parallm::train {
namespace {

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           cat("parallm_trainer_", ::testing::UnitTest::GetInstance()->current_test_info()->name(),
               "_", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    config_ = write_config(testing::tiny_train_config(), "config.json");
    data_ = write_ids(random_ids(3000, 67, 5), "data.bin");
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write_config(const ModelConfig& c, const std::string& name) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path) << c.to_json().dump(2);
    return path;
  }
  static std::vector<uint16_t> random_ids(size_t n, int vocab, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<uint16_t> ids(n);
    // A skewed distribution (some tokens far more likely), so the loss can fall.
    for (auto& id : ids) id = static_cast<uint16_t>((rng() % vocab) * (rng() % vocab) / vocab);
    return ids;
  }
  std::string write_ids(const std::vector<uint16_t>& ids, const std::string& name) {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(ids.data()),
              static_cast<std::streamsize>(ids.size() * 2));
    return path;
  }
  TrainOptions base() const {
    TrainOptions o;
    o.init = config_;
    o.data = data_;
    o.seq_len = 8;
    o.micro_batch = 2;
    o.global_batch = 12;
    o.steps = 10;
    o.adamw.lr = 1e-2;
    o.adamw.min_lr = 1e-3;
    o.adamw.warmup_steps = 2;
    o.adamw.schedule = "cosine";
    o.adamw.weight_decay = 0.1;
    o.adamw.grad_clip = 0.5;  // below the first steps' norms: clipping is exercised
    // Adam's default eps (1e-8) turns f32 rounding in near-zero gradients into full-size updates
    // (m / sqrt(v) is +-1 whatever the magnitude), and the layouts' parameters then drift apart
    // chaotically: with 1e-8 the grad norms of TP 2 and one rank parted by 2e-3 by step 9 on an
    // AVX-512 CPU. 1e-5 is above those gradients: the drift stays near 1e-5.
    o.adamw.eps = 1e-5;
    o.seed = 3;
    o.threads = 1;
    o.bucket_bytes = 4096;  // several buckets for the tiny model
    o.quiet = true;
    o.backend = "local";
    o.comm_timeout_s = 60;
    return o;
  }
  static std::string read_bytes(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
  }

  fs::path dir_;
  std::string config_, data_;
};

void expect_close_losses(const TrainResult& ref, const TrainResult& got, const std::string& what) {
  ASSERT_EQ(ref.steps.size(), got.steps.size()) << what;
  for (size_t i = 0; i < ref.steps.size(); ++i) {
    EXPECT_NEAR(got.steps[i].loss, ref.steps[i].loss, 1e-5 * std::abs(ref.steps[i].loss))
        << what << " step " << i + 1;
    // The norm is looser: it sums the squares of near-zero gradients, whose f32 rounding the
    // layouts do not share (base() sets Adam's eps so that this stays small).
    EXPECT_NEAR(got.steps[i].grad_norm, ref.steps[i].grad_norm, 1e-4 * ref.steps[i].grad_norm)
        << what << " step " << i + 1;
    EXPECT_EQ(got.steps[i].lr, ref.steps[i].lr) << what << " step " << i + 1;
  }
}

TEST_F(TrainerTest, LayoutsMatchOneRank) {
  const TrainResult ref = run_training(base());
  ASSERT_EQ(ref.steps.size(), 10u);
  EXPECT_LT(ref.steps.back().loss, ref.steps.front().loss);  // it learns
  EXPECT_GT(ref.steps.front().grad_norm, 0.5);               // so the clip was active
  struct Layout {
    int tp, dp, zero;
  };
  for (Layout l :
       {Layout{2, 1, 0}, Layout{3, 1, 0}, Layout{4, 1, 0}, Layout{1, 2, 0}, Layout{1, 3, 0},
        Layout{1, 2, 1}, Layout{1, 3, 1}, Layout{2, 2, 0}, Layout{2, 2, 1}}) {
    TrainOptions o = base();
    o.tp = l.tp;
    o.dp = l.dp;
    o.zero = l.zero;
    expect_close_losses(ref, run_training(o),
                        cat("tp ", l.tp, " dp ", l.dp, l.zero ? " zero" : ""));
  }
}

// --shuffle and the validation loss: the same at DP 3 with ZeRO and at TP 2 as on one rank.
TEST_F(TrainerTest, ShuffleAndEvalMatchOneRank) {
  TrainOptions o = base();
  o.steps = 4;
  o.shuffle = true;
  o.val_ids = std::make_shared<TokenData>(TokenData::from_ids(
      [] {
        std::vector<int32_t> v;
        for (uint16_t id : random_ids(400, 67, 9)) v.push_back(id);
        return v;
      }(),
      67));
  o.eval_every = 2;
  const TrainResult ref = run_training(o);
  TrainOptions plain = o;
  plain.shuffle = false;
  EXPECT_NE(run_training(plain).steps[1].loss, ref.steps[1].loss);  // the order did change
  for (auto [tp, dp] : {std::pair{1, 3}, std::pair{2, 1}}) {
    TrainOptions l = o;
    l.tp = tp;
    l.dp = dp;
    l.zero = dp > 1;
    const TrainResult got = run_training(l);
    expect_close_losses(ref, got, cat("shuffle tp ", tp, " dp ", dp));
    for (size_t i = 0; i < ref.steps.size(); ++i) {
      EXPECT_EQ(got.steps[i].val_loss >= 0, i % 2 == 1);
      EXPECT_NEAR(got.steps[i].val_loss, ref.steps[i].val_loss,
                  1e-5 * std::abs(ref.steps[i].val_loss));
    }
  }
}

// TP 4 over 2 KV heads: each KV head on two ranks. The global norm counts a replicated head once
// (on the first of its replicas), not once per replica and not only rank 0's.
TEST_F(TrainerTest, KvReplicatedTp4MatchesOneRank) {
  TrainOptions o = base();
  o.init = write_config(testing::tiny_train_config_kv_replicated(), "kv.json");
  o.steps = 4;
  const TrainResult ref = run_training(o);
  o.tp = 4;
  expect_close_losses(ref, run_training(o), "kv-replicated tp 4");
  o.tp = 2;
  o.dp = 2;
  o.zero = 1;
  expect_close_losses(ref, run_training(o), "kv-replicated tp 2 dp 2 zero");
}

// --dtype bf16 (bf16 matrix products, f32 master weights and state) follows the f32 run closely
// at TP 2 x DP 2.
TEST_F(TrainerTest, Bf16ComputeTracksF32) {
  const TrainResult ref = run_training(base());
  TrainOptions o = base();
  o.dtype = "bf16";
  o.tp = 2;
  o.dp = 2;
  const TrainResult got = run_training(o);
  ASSERT_EQ(got.steps.size(), ref.steps.size());
  double worst = 0;
  for (size_t i = 0; i < ref.steps.size(); ++i)
    worst = std::max(worst, std::abs(got.steps[i].loss - ref.steps[i].loss) / ref.steps[i].loss);
  std::printf("[bf16] worst relative loss difference to f32 over 10 steps: %.2e\n", worst);
  EXPECT_LT(worst, 2e-2);
  EXPECT_GT(worst, 0.0);  // it did compute in bf16
}

TEST_F(TrainerTest, GradientAccumulationMatchesOneMicroBatch) {
  // G = 12 sequences in micro-batches of 2 (6 of them) or of 12 (one): the same gradients.
  const TrainResult ref = run_training(base());
  TrainOptions o = base();
  o.micro_batch = 12;
  expect_close_losses(ref, run_training(o), "one micro-batch");
}

TEST_F(TrainerTest, ResumeContinuesBitForBit) {
  TrainOptions full = base();
  full.dp = 2;
  full.zero = 1;
  full.save = (dir_ / "full").string();
  const TrainResult a = run_training(full);

  TrainOptions half = full;
  half.save = (dir_ / "half").string();
  half.stop_after = 5;
  const TrainResult b = run_training(half);
  ASSERT_EQ(b.steps.size(), 5u);
  const CheckpointInfo info = read_checkpoint_info(half.save);
  EXPECT_EQ(info.step, 5);

  TrainOptions rest = full;
  rest.init.clear();  // the model comes from the checkpoint
  rest.resume = half.save;
  rest.save = (dir_ / "resumed").string();
  const TrainResult c = run_training(rest);
  ASSERT_EQ(c.steps.size(), 5u);
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(b.steps[i].loss, a.steps[i].loss) << "step " << i + 1;
    EXPECT_EQ(c.steps[i].loss, a.steps[5 + i].loss) << "step " << 6 + i;
    EXPECT_EQ(c.steps[i].grad_norm, a.steps[5 + i].grad_norm) << "step " << 6 + i;
    EXPECT_EQ(c.steps[i].lr, a.steps[5 + i].lr) << "step " << 6 + i;
  }
  for (const char* f : {"model.safetensors", "optimizer.safetensors"})
    EXPECT_TRUE(read_bytes(dir_ / "full" / f) == read_bytes(dir_ / "resumed" / f)) << f;

  // At another layout (TP 2, no ZeRO) from the same checkpoint: the same losses within f32
  // rounding (the checkpoint holds whole tensors).
  TrainOptions other = rest;
  other.tp = 2;
  other.dp = 1;
  other.zero = 0;
  other.save.clear();
  const TrainResult d = run_training(other);
  ASSERT_EQ(d.steps.size(), 5u);
  for (size_t i = 0; i < 5; ++i)
    EXPECT_NEAR(d.steps[i].loss, a.steps[5 + i].loss, 1e-5 * a.steps[5 + i].loss);
}

// A stop request (what SIGINT does) ends the run after the step every rank is in, with a
// checkpoint there that resumes.
TEST_F(TrainerTest, StopRequestSavesAndResumes) {
  TrainOptions o = base();
  o.tp = 2;
  o.dp = 2;
  o.save = (dir_ / "stopped").string();
  request_training_stop();  // before the first step ends: the ranks stop after step 1
  const TrainResult r = run_training(o);
  clear_training_stop();
  EXPECT_TRUE(r.stopped);
  ASSERT_EQ(r.steps.size(), 1u);
  EXPECT_EQ(read_checkpoint_info(o.save).step, 1);
  TrainOptions rest = o;
  rest.init.clear();
  rest.resume = o.save;
  rest.save.clear();
  const TrainResult c = run_training(rest);
  EXPECT_FALSE(c.stopped);
  EXPECT_EQ(c.steps.size(), 9u);
}

TEST_F(TrainerTest, CheckpointIsAHuggingFaceModel) {
  TrainOptions o = base();
  o.tp = 2;
  o.steps = 3;
  o.save = (dir_ / "ckpt").string();
  o.log_json = (dir_ / "log.jsonl").string();
  o.val_ids = std::make_shared<TokenData>(TokenData::from_ids(std::vector<int32_t>(200, 3), 67));
  o.eval_every = 2;
  run_training(o);
  for (const char* f :
       {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"})
    EXPECT_TRUE(fs::exists(dir_ / "ckpt" / f)) << f;
  EXPECT_EQ(ModelConfig::from_file((dir_ / "ckpt" / "config.json").string()).hidden_size, 48);
  // One JSON object per step; val_loss at step 2.
  std::ifstream log(o.log_json);
  std::string line;
  int n = 0;
  while (std::getline(log, line)) {
    const auto j = nlohmann::json::parse(line);
    ++n;
    EXPECT_EQ(j["step"], n);
    for (const char* k : {"loss", "lr", "grad_norm", "tokens_per_s"})
      EXPECT_TRUE(j.contains(k)) << k;
    EXPECT_EQ(j.contains("val_loss"), n == 2);
  }
  EXPECT_EQ(n, 3);
  // parallm generate loads the directory as it is.
  const std::string cmd = cat(PARALLM_BIN, " generate --model ", (dir_ / "ckpt").string(),
                              " --prompt-ids 1,2,3 --max-tokens 4 --print-ids --threads 1 --tp 2 "
                              "> /dev/null 2>&1");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

// Text end to end through the CLI: a sentencepiece tokenizer trained on the text, `train --init
// --tokenizer` on the text file (the vocabulary is the tokenizer's, which the checkpoint keeps),
// and `generate --prompt` on the checkpoint prints text.
TEST_F(TrainerTest, TextCorpusToGeneratedText) {
  const fs::path text = dir_ / "corpus.txt";
  {
    std::ofstream out(text);
    for (int i = 0; i < 60; ++i)
      out << "in the beginning was the word and the word was with the light " << i % 7 << "\n"
          << "and the light shone in the darkness and the darkness knew it not\n";
  }
  const std::string bin = PARALLM_BIN, d = dir_.string();
  ASSERT_EQ(std::system(cat(bin, " tokenizer train --in ", text.string(), " --vocab-size 60 --out ",
                            d, "/tok.model --threads 1 > /dev/null 2>&1")
                            .c_str()),
            0);
  const std::string tok = d + "/tok.model";
  ASSERT_TRUE(fs::exists(tok));
  const std::string cfg = write_config(testing::tiny_train_config(), "text.json");
  const std::string train =
      cat(bin, " train --init ", cfg, " --tokenizer ", tok, " --data ", text.string(),
          " --seq-len 16 --micro-batch-size 2 --global-batch-size 4 --steps 30 --lr 1e-2 "
          "--warmup-steps 3 --tp 2 --dp 2 --zero 1 --threads 1 --quiet --save ",
          d, "/text_ckpt 2> ", d, "/train.err");
  ASSERT_EQ(std::system(train.c_str()), 0) << read_bytes(dir_ / "train.err");
  EXPECT_TRUE(fs::exists(dir_ / "text_ckpt" / "tokenizer.model"));
  EXPECT_EQ(ModelConfig::from_file(d + "/text_ckpt/config.json").vocab_size, 60);
  const std::string gen = cat(bin, " generate --model ", d, "/text_ckpt --prompt \"and the\" ",
                              "--max-tokens 8 --threads 1 > ", d, "/gen.txt 2> /dev/null");
  ASSERT_EQ(std::system(gen.c_str()), 0);
  const std::string out = read_bytes(dir_ / "gen.txt");
  EXPECT_EQ(out.rfind("and the", 0), 0u) << out;
  EXPECT_GT(out.size(), std::string("and the").size() + 3) << out;  // words follow, not ids
  std::printf("[text] generated: %s", out.c_str());
}

// ZeRO-1 holds 8 + 8/DP bytes per parameter (f32 values and grads whole, m and v sharded);
// without it 16. Measured from each rank's allocations.
TEST_F(TrainerTest, ZeroOptimizerBytesPerRank) {
  TrainOptions o = base();
  o.steps = 1;
  o.dp = 1;
  const TrainResult one = run_training(o);
  ASSERT_EQ(one.optimizer_bytes.size(), 1u);
  const double numel = static_cast<double>(one.param_numel[0]);
  EXPECT_EQ(one.param_numel[0], ModelConfig(one.config).param_count());
  EXPECT_EQ(one.state_numel[0], one.param_numel[0]);
  // The flat buffers pad each tensor to 16 floats: a few percent on this tiny model.
  EXPECT_NEAR(one.optimizer_bytes[0] / numel, 16.0, 16.0 * 0.05);
  for (int D : {2, 3}) {
    o.dp = D;
    o.zero = 1;
    const TrainResult z = run_training(o);
    ASSERT_EQ(z.optimizer_bytes.size(), static_cast<size_t>(D));
    int64_t state = 0;
    for (int r = 0; r < D; ++r) {
      state += z.state_numel[r];
      EXPECT_NEAR(z.optimizer_bytes[r] / numel, 8.0 + 8.0 / D, (8.0 + 8.0 / D) * 0.06)
          << "DP " << D << " rank " << r;
      std::printf("[zero] dp %d rank %d: %llu bytes for %.0f parameters = %.3f bytes/param\n", D, r,
                  static_cast<unsigned long long>(z.optimizer_bytes[r]), numel,
                  z.optimizer_bytes[r] / numel);
    }
    EXPECT_EQ(state, one.param_numel[0]);  // m (and v): every parameter exactly once over DP
  }
}

// Each bad input: one line naming the cause, and nothing written at --save.
TEST_F(TrainerTest, BadInputOneLineNothingWritten) {
  auto refused = [&](TrainOptions o, const std::string& needle) {
    o.save = (dir_ / "never").string();
    try {
      run_training(o);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
    EXPECT_FALSE(fs::exists(dir_ / "never")) << needle;
  };
  {  // an id outside the vocabulary (67)
    std::vector<uint16_t> ids = random_ids(200, 67, 1);
    ids[123] = 70;
    TrainOptions o = base();
    o.data = write_ids(ids, "bad_id.bin");
    refused(o, "70");
  }
  {  // shorter than one sequence (S + 1 tokens needed)
    TrainOptions o = base();
    o.data = write_ids(random_ids(8, 67, 1), "short.bin");
    refused(o, "short.bin");
  }
  {  // G not a multiple of micro-batch x DP
    TrainOptions o = base();
    o.global_batch = 10;
    o.dp = 3;
    refused(o, "--global-batch-size");
  }
  {  // --tp that the heads do not allow
    TrainOptions o = base();
    o.tp = 5;
    refused(o, "--tp 5");
  }
  // A checkpoint of another model: refused naming the field; the checkpoint stays as it was.
  TrainOptions o = base();
  o.steps = 2;
  o.save = (dir_ / "ckpt").string();
  run_training(o);
  const std::string before = read_bytes(dir_ / "ckpt" / "model.safetensors");
  ModelConfig other = testing::tiny_train_config();
  other.intermediate_size = 96;
  TrainOptions r = base();
  r.init = write_config(other, "other.json");
  r.resume = (dir_ / "ckpt").string();
  refused(r, "intermediate_size");
  EXPECT_EQ(read_bytes(dir_ / "ckpt" / "model.safetensors"), before);
  // --save onto the directory resumed from, or onto something that is not a checkpoint.
  TrainOptions same = base();
  same.init.clear();
  same.resume = (dir_ / "ckpt").string();
  same.save = same.resume;
  EXPECT_THROW(run_training(same), std::invalid_argument);
  EXPECT_EQ(read_bytes(dir_ / "ckpt" / "model.safetensors"), before);
  fs::create_directories(dir_ / "precious");
  std::ofstream(dir_ / "precious" / "notes.txt") << "keep me";
  TrainOptions foreign = base();
  foreign.save = (dir_ / "precious").string();
  EXPECT_THROW(run_training(foreign), std::invalid_argument);
  EXPECT_TRUE(fs::exists(dir_ / "precious" / "notes.txt"));
  // A --save below a file fails before training, not after it.
  TrainOptions below = base();
  below.save = (dir_ / "precious" / "notes.txt" / "ckpt").string();
  EXPECT_THROW(run_training(below), std::invalid_argument);
}

// The CLI: one line on stderr naming the flag, exit status non-zero.
TEST_F(TrainerTest, CliBadBatchIsOneLine) {
  const std::string err = (dir_ / "err.txt").string();
  const std::string cmd =
      cat(PARALLM_BIN, " train --init ", config_, " --data ", data_,
          " --seq-len 8 --micro-batch-size 2 --global-batch-size 10 --dp 3 --steps 2 2> ", err);
  EXPECT_NE(std::system(cmd.c_str()), 0);
  const std::string text = read_bytes(err);
  EXPECT_NE(text.find("--global-batch-size"), std::string::npos) << text;
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1) << text;
}

}  // namespace
}  // namespace parallm::train
