// Training data (train/data.h): token files, the documented batch order, shuffling, and every
// error a bad data file or batch layout gets.
#include "parallm/train/data.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <numeric>
#include <set>

#include "parallm/core/thread_pool.h"
#include "parallm/model/tokenizer.h"
#include "test_util.h"

namespace parallm::train {
namespace {

using testing::error_of;
using testing::TempDir;

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<int32_t> iota_ids(int n, int vocab) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = (i * 7 + 3) % vocab;
  return ids;
}

TEST(TokenFile, U16AndU32AreLittleEndian) {
  TempDir tmp;
  write_bytes(tmp / "a.bin", {0x01, 0x00, 0x34, 0x12, 0xff, 0xff});
  auto d = TokenData::from_bin(tmp / "a.bin", TokenFileType::U16, 65536);
  EXPECT_EQ(d.ids(), (std::vector<int32_t>{1, 0x1234, 0xffff}));
  write_bytes(tmp / "b.bin", {0x01, 0x00, 0x00, 0x00, 0x78, 0x56, 0x34, 0x02});
  d = TokenData::from_bin(tmp / "b.bin", TokenFileType::U32, 0x3000000);
  EXPECT_EQ(d.ids(), (std::vector<int32_t>{1, 0x02345678}));
}

TEST(TokenFile, WriteThenReadRoundTrips) {
  TempDir tmp;
  auto ids = iota_ids(1001, 7000);
  ids.push_back(65539);
  ids.push_back(12);
  write_token_file(tmp / "u32.bin", ids, TokenFileType::U32);
  EXPECT_EQ(TokenData::from_bin(tmp / "u32.bin", TokenFileType::U32, 70000).ids(), ids);
  const auto small = iota_ids(1001, 500);
  write_token_file(tmp / "u16.bin", small, TokenFileType::U16);
  EXPECT_EQ(std::filesystem::file_size(tmp / "u16.bin"), 2002u);
  EXPECT_EQ(TokenData::from_bin(tmp / "u16.bin", TokenFileType::U16, 500).ids(), small);
  // An id that does not fit u16 is refused with its index, and nothing is written.
  const std::string e = error_of([&] { write_token_file(tmp / "x.bin", ids, TokenFileType::U16); });
  EXPECT_TRUE(has(e, "token id 65539 at index 1001")) << e;
  EXPECT_TRUE(has(e, "--data-dtype u16")) << e;
  EXPECT_FALSE(std::filesystem::exists(tmp / "x.bin"));
}

TEST(TokenFile, EveryErrorIsOneLineNamingTheCause) {
  TempDir tmp;
  // Size not a multiple of the id width.
  write_bytes(tmp / "odd.bin", {1, 0, 2});
  std::string e = error_of([&] { TokenData::from_bin(tmp / "odd.bin", TokenFileType::U16, 10); });
  EXPECT_TRUE(has(e, tmp / "odd.bin") && has(e, "size 3 bytes is not a multiple of 2")) << e;
  write_bytes(tmp / "six.bin", {1, 0, 2, 0, 3, 0});
  e = error_of([&] { TokenData::from_bin(tmp / "six.bin", TokenFileType::U32, 10); });
  EXPECT_TRUE(has(e, "not a multiple of 4 (u32 ids)") && has(e, "--data-dtype")) << e;
  // An id outside the vocabulary: the id and its index.
  write_bytes(tmp / "big.bin", {1, 0, 2, 0, 9, 0, 10, 0});
  e = error_of([&] { TokenData::from_bin(tmp / "big.bin", TokenFileType::U16, 10); });
  EXPECT_TRUE(has(e, "token id 10 at index 3") && has(e, "vocabulary [0, 10)")) << e;
  e = error_of([&] { TokenData::from_ids({0, 1, -1}, 10); });
  EXPECT_TRUE(has(e, "token id -1 at index 2")) << e;
  // Missing, a directory, a FIFO (refused without blocking).
  e = error_of([&] { TokenData::from_bin(tmp / "none.bin", TokenFileType::U16, 10); });
  EXPECT_TRUE(has(e, "none.bin: no such file")) << e;
  e = error_of([&] { TokenData::from_bin(tmp.path(), TokenFileType::U16, 10); });
  EXPECT_TRUE(has(e, "not a regular file")) << e;
  ASSERT_EQ(mkfifo((tmp / "fifo").c_str(), 0600), 0);
  e = error_of([&] { TokenData::from_bin(tmp / "fifo", TokenFileType::U16, 10); });
  EXPECT_TRUE(has(e, "FIFO")) << e;
  // Unreadable (permissions; root reads anything, so only checked when not root).
  write_bytes(tmp / "locked.bin", {1, 0});
  chmod((tmp / "locked.bin").c_str(), 0);
  if (geteuid() != 0) {
    try {
      TokenData::from_bin(tmp / "locked.bin", TokenFileType::U16, 10);
      ADD_FAILURE() << "read an unreadable file";
    } catch (const std::runtime_error& err) {
      EXPECT_TRUE(has(err.what(), "cannot open")) << err.what();
    }
  }
  // Shorter than one sequence: S + 1 tokens are needed.
  write_bytes(tmp / "short.bin", {1, 0, 2, 0, 3, 0, 4, 0});
  auto d = TokenData::from_bin(tmp / "short.bin", TokenFileType::U16, 10);
  EXPECT_EQ(d.sequences(3), 1);
  e = error_of([&] { d.sequences(4); });
  EXPECT_TRUE(has(e, "short.bin: 4 tokens are fewer than one sequence of --seq-len 4")) << e;
  EXPECT_EQ(error_of([&] { TokenData::from_ids({}, 10).sequences(1); }).find("0 tokens") !=
                std::string::npos,
            true);
  EXPECT_TRUE(has(error_of([&] { d.sequences(0); }), "--seq-len 0"));
  EXPECT_TRUE(
      has(error_of([] { parse_token_file_type("u8", "--data-dtype"); }), "--data-dtype \"u8\""));
}

TEST(BatchOrder, CheckNamesTheFlagsAndValues) {
  BatchOrder o{.seq_len = 4, .global_batch = 12, .micro_batch = 2, .dp = 3};
  EXPECT_EQ(error_of([&] { o.check(); }), "no error");
  EXPECT_EQ(o.micro_batches(), 2);
  o.global_batch = 10;
  const std::string e = error_of([&] { o.check(); });
  EXPECT_TRUE(has(e, "--global-batch-size 10 is not a multiple of --micro-batch-size 2 x --dp 3"))
      << e;
  o.global_batch = 12;
  o.micro_batch = 0;
  EXPECT_TRUE(has(error_of([&] { o.check(); }), "--micro-batch-size 0"));
  o.micro_batch = 2;
  o.dp = 0;
  EXPECT_TRUE(has(error_of([&] { o.check(); }), "--dp 0"));
  o.dp = 3;
  o.seq_len = 0;
  EXPECT_TRUE(has(error_of([&] { o.check(); }), "--seq-len 0"));
}

// The order exactly as docs/training.md states it, spelled out independently here.
TEST(BatchOrder, SequencesDpBlocksMicroBatchesAndWrapAround) {
  const int64_t S = 3, G = 8, M = 2;
  const int dp = 2;
  // 41 tokens: floor(40 / 3) = 13 sequences; token t has id t (vocab 64).
  std::vector<int32_t> ids(41);
  std::iota(ids.begin(), ids.end(), 0);
  const auto data = TokenData::from_ids(ids, 64);
  ASSERT_EQ(data.sequences(S), 13);
  BatchOrder o{.seq_len = S, .global_batch = G, .micro_batch = M, .dp = dp};
  o.check();
  ASSERT_EQ(o.micro_batches(), 2);
  for (int64_t step = 0; step < 5; ++step) {
    for (int d = 0; d < dp; ++d) {
      for (int64_t mb = 0; mb < 2; ++mb) {
        std::vector<int32_t> in(static_cast<size_t>(M * S)), tg(in.size());
        fill_micro_batch(data, o, step, d, mb, in.data(), tg.data());
        for (int64_t i = 0; i < M; ++i) {
          // Rank d's block is sequences [step*G + d*G/dp, +G/dp); micro-batch mb is M of them.
          const int64_t j = (step * G + d * (G / dp) + mb * M + i) % 13;
          EXPECT_EQ(o.sequence(step, d, mb, i, 13), j);
          for (int64_t s = 0; s < S; ++s) {
            EXPECT_EQ(in[static_cast<size_t>(i * S + s)], j * S + s);
            EXPECT_EQ(tg[static_cast<size_t>(i * S + s)], j * S + s + 1);
          }
        }
      }
    }
  }
  // Concrete spot checks: step 1, rank 1, micro 1, sequence 1 is position 8+4+2+1 = 15 -> 2.
  EXPECT_EQ(o.sequence(1, 1, 1, 1, 13), 2);
  std::vector<int32_t> in(6), tg(6);
  fill_micro_batch(data, o, 0, 1, 0, in.data(), tg.data());  // sequences 4, 5
  EXPECT_EQ(in, (std::vector<int32_t>{12, 13, 14, 15, 16, 17}));
  EXPECT_EQ(tg, (std::vector<int32_t>{13, 14, 15, 16, 17, 18}));
  // Out-of-range positions are refused.
  EXPECT_TRUE(has(error_of([&] { o.sequence(0, 2, 0, 0, 13); }), "dp rank 2/2"));
  EXPECT_TRUE(has(error_of([&] { o.sequence(0, 0, 2, 0, 13); }), "micro-batch 2/2"));
}

TEST(BatchOrder, TheLastTokenIsOnlyATarget) {
  // n = 7, S = 3: floor(6/3) = 2 sequences; sequence 1's last target is token 6.
  const auto data = TokenData::from_ids({10, 11, 12, 13, 14, 15, 16}, 20);
  BatchOrder o{.seq_len = 3, .global_batch = 1, .micro_batch = 1, .dp = 1};
  std::vector<int32_t> in(3), tg(3);
  fill_micro_batch(data, o, 1, 0, 0, in.data(), tg.data());
  EXPECT_EQ(in, (std::vector<int32_t>{13, 14, 15}));
  EXPECT_EQ(tg, (std::vector<int32_t>{14, 15, 16}));
  fill_micro_batch(data, o, 2, 0, 0, in.data(), tg.data());  // wraps to sequence 0
  EXPECT_EQ(in, (std::vector<int32_t>{10, 11, 12}));
}

// The shuffle as docs/training.md specifies it, re-implemented from the text.
uint64_t doc_mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int64_t doc_shuffle(uint64_t seed, uint64_t pass, int64_t index, int64_t count) {
  int h = 1;
  while ((uint64_t{1} << (2 * h)) < static_cast<uint64_t>(count)) ++h;
  uint64_t y = static_cast<uint64_t>(index);
  do {
    uint64_t l = y >> h, r = y & ((uint64_t{1} << h) - 1);
    for (uint64_t round = 0; round < 6; ++round) {
      const uint64_t key = doc_mix(seed ^ doc_mix(pass ^ doc_mix(round)));
      const uint64_t f = doc_mix(r ^ key) & ((uint64_t{1} << h) - 1);
      const uint64_t nl = r;
      r = l ^ f;
      l = nl;
    }
    y = (l << h) | r;
  } while (y >= static_cast<uint64_t>(count));
  return static_cast<int64_t>(y);
}

TEST(Shuffle, APermutationPerPassAsDocumented) {
  for (int64_t count : {1, 2, 3, 5, 16, 17, 100, 1000}) {
    std::set<int64_t> seen;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t y = shuffle_index(42, 0, i, count);
      EXPECT_EQ(y, doc_shuffle(42, 0, i, count));
      seen.insert(y);
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), count);
    EXPECT_GE(*seen.begin(), 0);
    EXPECT_LT(*seen.rbegin(), count);
  }
  // Different passes and seeds give different orders (1000! orders: a collision means a bug).
  auto order = [](uint64_t seed, uint64_t pass) {
    std::vector<int64_t> v;
    for (int64_t i = 0; i < 1000; ++i) v.push_back(shuffle_index(seed, pass, i, 1000));
    return v;
  };
  EXPECT_NE(order(1, 0), order(1, 1));
  EXPECT_NE(order(1, 0), order(2, 0));
  EXPECT_EQ(order(1, 0), order(1, 0));
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(order(1, 0), identity);
}

TEST(Shuffle, BatchOrderUsesPassOfThePosition) {
  BatchOrder o{
      .seq_len = 2, .global_batch = 4, .micro_batch = 1, .dp = 2, .shuffle = true, .seed = 9};
  const int64_t count = 10;
  // Every pass over the data visits each sequence once.
  std::vector<int64_t> stream;
  for (int64_t step = 0; step < 5; ++step)
    for (int d = 0; d < 2; ++d)
      for (int64_t mb = 0; mb < 2; ++mb) stream.push_back(o.sequence(step, d, mb, 0, count));
  for (int pass = 0; pass < 2; ++pass) {
    std::set<int64_t> seen(stream.begin() + pass * 10, stream.begin() + pass * 10 + 10);
    EXPECT_EQ(seen.size(), 10u);
  }
  EXPECT_EQ(stream[13], shuffle_index(9, 1, 3, count));  // position 13: pass 1, index 3
  EXPECT_NE(std::vector<int64_t>(stream.begin(), stream.begin() + 10),
            std::vector<int64_t>(stream.begin() + 10, stream.end()));
}

// A tokenizer trained by `parallm tokenizer train` on a small English text (tests/cli covers the
// command itself).
std::string small_tokenizer(const TempDir& tmp) {
  {
    std::ofstream f(tmp / "corpus.txt");
    const char* lines[] = {"Once upon a time there was a little girl.",
                           "She lived in a house by the sea with her mother.",
                           "Every day the girl walked to the water and sang a song.",
                           "The birds came to listen, and the fish swam near."};
    for (int r = 0; r < 30; ++r)
      for (const char* l : lines) f << l << "\n";
  }
  auto r = testing::run_parallm("tokenizer train --in " + (tmp / "corpus.txt") +
                                " --vocab-size 80 --threads 1 --out " + tmp.path());
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return tmp / "tokenizer.model";
}

TEST(TextData, TokenizedWithBosAndCheckedAgainstTheVocabulary) {
  TempDir tmp;
  auto tok = load_tokenizer_file(small_tokenizer(tmp));
  ASSERT_TRUE(tok);
  const std::string text = "Once upon a time there was a little girl.";
  {
    std::ofstream f(tmp / "t.txt");
    f << text;
  }
  const auto d = TokenData::from_text(tmp / "t.txt", *tok, tok->vocab_size());
  ASSERT_GT(d.size(), 5);
  EXPECT_EQ(d.ids()[0], tok->bos_id());
  EXPECT_EQ(d.ids(), tok->encode(text, true));
  EXPECT_EQ(tok->decode(d.ids()), text);
  // A model vocabulary smaller than the tokenizer's is caught with the index: the first id at
  // or above 3 (after <unk>, <s>, </s>) is the first piece of the text, index 1.
  const std::string e = error_of([&] { TokenData::from_text(tmp / "t.txt", *tok, 3); });
  EXPECT_TRUE(has(e, "t.txt: token id ") && has(e, "at index 1 ")) << e;
  EXPECT_TRUE(has(error_of([&] { TokenData::from_text(tmp / "no.txt", *tok, 512); }),
                  "no.txt: no such file"));
  // from_file: *.bin is a token file, anything else text.
  write_token_file(tmp / "t.bin", d.ids(), TokenFileType::U16);
  EXPECT_EQ(TokenData::from_file(tmp / "t.bin", TokenFileType::U16, nullptr, 80).ids(), d.ids());
  EXPECT_EQ(TokenData::from_file(tmp / "t.txt", TokenFileType::U16, tok.get(), 80).ids(), d.ids());
  EXPECT_TRUE(
      has(error_of([&] { TokenData::from_file(tmp / "t.txt", TokenFileType::U16, nullptr, 80); }),
          "t.txt: a text file (not *.bin) needs the model's tokenizer"));
}

TEST(TextData, LineByLineOnAnyThreadCountEqualsOneEncodeForSentencePiece) {
  TempDir tmp;
  auto tok = load_tokenizer_file(small_tokenizer(tmp));
  // About 300 KB: several blocks for the threads; the last line without its newline.
  std::string text;
  for (int r = 0; r < 2000; ++r) text += "The birds came to listen, and the fish swam near.\n";
  for (int r = 0; r < 2000; ++r) text += "She lived in a house by the sea.\n\n";
  text += "Once upon a time";
  {
    std::ofstream f(tmp / "long.txt");
    f << text;
  }
  const auto one = TokenData::from_text(tmp / "long.txt", *tok, tok->vocab_size());
  EXPECT_EQ(one.ids(), tok->encode(text, true));
  ThreadPool pool(3);
  ScopedPool scoped(pool);
  EXPECT_EQ(TokenData::from_text(tmp / "long.txt", *tok, tok->vocab_size()).ids(), one.ids());
}

}  // namespace
}  // namespace parallm::train
