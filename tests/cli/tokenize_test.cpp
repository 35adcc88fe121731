// `parallm tokenizer train` and `parallm tokenize` end to end, and the KJV corpus script
// (scripts/kjv-corpus.sh) where Debian's bible-kjv is installed: token files that decode back to
// the text they came from.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "parallm/model/tokenizer.h"
#include "parallm/train/data.h"
#include "test_util.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;
using testing::run_command;
using testing::run_parallm;
using testing::TempDir;

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

const char* kLines[] = {"In the beginning the rank held a slice of the weights.",
                        "And the model said, Let there be tensors: and there were tensors.",
                        "And every rank saw the data, that it was good.",
                        "The gradients were gathered, and the optimizer took a step."};

// A corpus of the lines above, repeated, and a tokenizer trained on it.
struct Trained {
  TempDir tmp;
  std::string corpus, model;
  // sentencepiece's unigram trainer finds at most 62 pieces in this small text.
  explicit Trained(const std::string& type = "bpe", int vocab = 120) {
    corpus = tmp / "corpus.txt";
    std::ofstream f(corpus);
    for (int r = 0; r < 25; ++r)
      for (const char* l : kLines) f << l << "\n";
    f.close();
    auto r =
        run_parallm("tokenizer train --in " + corpus + " --vocab-size " + std::to_string(vocab) +
                    " --threads 1 --model-type " + type + " --out " + tmp.path());
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_TRUE(has(r.output, "vocabulary " + std::to_string(vocab))) << r.output;
    model = tmp / "tokenizer.model";
  }
};

TEST(TokenizerTrain, WritesAModelParallmLoadsWithLlamaSpecialIds) {
  for (auto [type, vocab] : {std::pair{"bpe", 120}, std::pair{"unigram", 60}}) {
    Trained t(type, vocab);
    ASSERT_TRUE(fs::exists(t.model)) << type;
    auto tok = load_tokenizer_file(t.model);
    EXPECT_EQ(tok->vocab_size(), vocab);
    EXPECT_EQ(tok->bos_id(), 1);
    EXPECT_EQ(tok->eos_id(), 2);
    EXPECT_EQ(tok->decode(tok->encode(kLines[1], true)), kLines[1]) << type;
  }
}

TEST(TokenizerTrain, OutputNamesAndErrors) {
  Trained t;
  // A prefix gets ".model"; a FILE.model is used as given.
  auto r = run_parallm("tokenizer train --in " + t.corpus + " --vocab-size 100 --threads 1 --out " +
                       (t.tmp / "sub/pre"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(t.tmp / "sub/pre.model"));
  // Too large a vocabulary for the text: sentencepiece's reason, one line, nothing written.
  r = run_parallm("tokenizer train --in " + t.corpus + " --vocab-size 5000 --out " +
                  (t.tmp / "big.model"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "--vocab-size 5000")) << r.output;
  EXPECT_FALSE(fs::exists(t.tmp / "big.model"));
  r = run_parallm("tokenizer train --in " + (t.tmp / "none.txt") + " --vocab-size 100 --out " +
                  t.tmp.path());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "none.txt: no such file")) << r.output;
  r = run_parallm("tokenizer train --in " + t.corpus +
                  " --vocab-size 100 --model-type word --out " + t.tmp.path());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "--model-type")) << r.output;
}

TEST(Tokenize, TokenFileDecodesToTheText) {
  Trained t;
  auto r = run_parallm("tokenize --tokenizer " + t.model + " --in " + t.corpus + " --out " +
                       (t.tmp / "c.bin"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto tok = load_tokenizer_file(t.model);
  const auto data = train::TokenData::from_bin(t.tmp / "c.bin", train::TokenFileType::U16, 120);
  EXPECT_EQ(fs::file_size(t.tmp / "c.bin"), 2u * static_cast<uint64_t>(data.size()));
  EXPECT_TRUE(has(r.output, std::to_string(data.size()) + " tokens (u16")) << r.output;
  ASSERT_GT(data.size(), 40);
  EXPECT_EQ(data.ids()[0], 1);  // BOS
  // Decoding the whole file gives the text with each line break as a space (nmt_nfkc).
  std::string want;
  for (int rep = 0; rep < 25; ++rep)
    for (const char* l : kLines) want += (want.empty() ? "" : " ") + std::string(l);
  EXPECT_EQ(tok->decode(data.ids()), want);
  // u32 holds the same ids; --model DIR finds DIR/tokenizer.model.
  r = run_parallm("tokenize --model " + t.tmp.path() + " --in " + t.corpus + " --data-dtype u32 " +
                  "--out " + (t.tmp / "c32.bin"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(train::TokenData::from_bin(t.tmp / "c32.bin", train::TokenFileType::U32, 120).ids(),
            data.ids());
}

TEST(Tokenize, BadInvocationsAreOneLineAndWriteNothing) {
  Trained t;
  const std::string out = t.tmp / "x.bin";
  auto r = run_parallm("tokenize --in " + t.corpus + " --out " + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "exactly one of --model DIR and --tokenizer FILE")) << r.output;
  r = run_parallm("tokenize --model " + t.tmp.path() + " --tokenizer " + t.model + " --in " +
                  t.corpus + " --out " + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "excludes")) << r.output;
  r = run_parallm("tokenize --tokenizer " + t.model + " --in " + (t.tmp / "none.txt") + " --out " +
                  out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "none.txt: no such file")) << r.output;
  TempDir empty;
  r = run_parallm("tokenize --model " + empty.path() + " --in " + t.corpus + " --out " + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "no tokenizer.json or tokenizer.model")) << r.output;
  EXPECT_FALSE(fs::exists(out));

  // A vocabulary over 65536 does not fit u16: a Hugging Face tokenizer.json with 70000 entries.
  nlohmann::json vocab = nlohmann::json::object();
  vocab["<unk>"] = 0;
  vocab["<s>"] = 1;
  vocab["</s>"] = 2;
  for (int i = 3; i < 70000; ++i) vocab["t" + std::to_string(i)] = i;
  nlohmann::json j;
  j["version"] = "1.0";
  j["added_tokens"] = nlohmann::json::array();
  for (int i = 0; i < 3; ++i) {
    j["added_tokens"].push_back({{"id", i},
                                 {"content", i == 0   ? "<unk>"
                                             : i == 1 ? "<s>"
                                                      : "</s>"},
                                 {"single_word", false},
                                 {"lstrip", false},
                                 {"rstrip", false},
                                 {"normalized", false},
                                 {"special", true}});
  }
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"add_prefix_space", true}};
  j["post_processor"] = nullptr;
  j["decoder"] = nullptr;
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", "<unk>"},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"vocab", vocab},
                {"merges", nlohmann::json::array()}};
  {
    std::ofstream f(t.tmp / "big.json");
    f << j.dump();
  }
  r = run_parallm("tokenize --tokenizer " + (t.tmp / "big.json") + " --in " + t.corpus + " --out " +
                  out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "--data-dtype u16 holds ids below 65536 but the tokenizer has 70000"))
      << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  EXPECT_FALSE(fs::exists(out));
}

// The README's corpus: only where Debian's bible-kjv is installed (the script would install it,
// but a unit test must not reach the network). Checks the files, the split, and that the first
// tokens of the training file decode to the first verses.
TEST(KjvCorpus, ScriptWritesTokenFilesThatDecodeToTheBible) {
  if (run_command("command -v bible && test -e /usr/lib/bible.data").exit_code != 0) {
    GTEST_SKIP() << "bible-kjv not installed (bash scripts/install-packages.sh bible-kjv "
                    "bible-kjv-text)";
  }
  TempDir tmp;
  auto r = run_command(
      "PARALLM=" PARALLM_BIN " bash " PARALLM_SOURCE_DIR "/scripts/kjv-corpus.sh " + tmp.path());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::printf("%s", r.output.substr(r.output.rfind("kjv-corpus:")).c_str());
  auto tok = load_tokenizer_file(tmp / "tokenizer.model");
  EXPECT_EQ(tok->vocab_size(), 2048);
  const auto train_data =
      train::TokenData::from_bin(tmp / "kjv.bin", train::TokenFileType::U16, 2048);
  const auto val = train::TokenData::from_bin(tmp / "kjv-val.bin", train::TokenFileType::U16, 2048);
  EXPECT_GT(train_data.size(), 1000000);
  EXPECT_GT(val.size(), 15000);
  const std::vector<int32_t> head(train_data.ids().begin(), train_data.ids().begin() + 40);
  const std::string text = tok->decode(head);
  EXPECT_EQ(text.rfind("In the beginning God created the heaven and the earth. And the earth was "
                       "without form, and void;",
                       0),
            0u)
      << text;
  const std::vector<int32_t> vhead(val.ids().begin(), val.ids().begin() + 12);
  EXPECT_EQ(tok->decode(vhead).rfind("Simon Peter, a servant", 0), 0u) << tok->decode(vhead);
  const std::string all = read_all(tmp / "kjv.txt");
  EXPECT_EQ(std::count(all.begin(), all.end(), '\n'), 31102);
  EXPECT_TRUE(has(all, "\nThe grace of our Lord Jesus Christ be with you all. Amen.\n"));
  // A second run keeps what is there.
  r = run_command("PARALLM=" PARALLM_BIN " bash " PARALLM_SOURCE_DIR "/scripts/kjv-corpus.sh " +
                  tmp.path());
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "already has")) << r.output;
}

}  // namespace
}  // namespace parallm
