// Tokenizers: a sentencepiece model trained here on a generated corpus (libsentencepiece is the
// reference for it), and small hand-made tokenizer.json files whose expected ids are worked out
// by hand in the comments (no Hugging Face library is available to produce them).
#include "parallm/model/tokenizer.h"

#include <gtest/gtest.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "llama_tokenizer_json.h"
#include "parallm/model/bpe.h"
#include "parallm/model/bpe_split.h"
#include "parallm/model/tokenizer_unicode.h"
#include "test_util.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Ids = std::vector<int32_t>;

using testing::TempDir;

// The message of the exception `f` throws, checking its type.
template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no exception";
  return "";
}

bool valid_utf8(const std::string& s) {
  return unicode::sanitize_utf8(s) == s;
}

// Streams `ids` through decode_token (raw) and TokenStreamer (whole characters).
struct Streamed {
  std::string raw;   // concatenated decode_token results
  std::string text;  // concatenated TokenStreamer results
  bool every_push_valid = true;
  int held_back = 0;  // pushes that returned nothing
};
Streamed stream(const Tokenizer& tok, const Ids& ids) {
  Streamed s;
  TokenStreamer streamer(tok);
  int32_t prev = -1;
  for (int32_t id : ids) {
    s.raw += tok.decode_token(prev, id);
    prev = id;
    const std::string piece = streamer.push(id);
    s.every_push_valid = s.every_push_valid && valid_utf8(piece);
    if (piece.empty()) ++s.held_back;
    s.text += piece;
  }
  s.text += streamer.finish();
  return s;
}

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers and the byte-level alphabet.

TEST(TokenizerUnicode, SanitizeReplacesMaximalIllFormedSubparts) {
  const std::string fffd = "\xEF\xBF\xBD";
  // Expected strings from Python: bytes.decode("utf-8", errors="replace").
  EXPECT_EQ(unicode::sanitize_utf8("\xE6\x97"
                                   "a\xFF"
                                   "b\xF0\x9F\x99"),
            fffd + "a" + fffd + "b" + fffd);
  EXPECT_EQ(unicode::sanitize_utf8("\xED\xA0\x80x\xC0\xAFy\xE0\x80"),
            fffd + fffd + fffd + "x" + fffd + fffd + "y" + fffd + fffd);
  EXPECT_EQ(unicode::sanitize_utf8("h\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x99\x82"),
            "h\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x99\x82");
}

TEST(TokenizerUnicode, CompletePrefixHoldsBackUnfinishedCharacters) {
  EXPECT_EQ(unicode::complete_utf8_prefix("ab\xE6\x97"), 2u);      // 日 missing its last byte
  EXPECT_EQ(unicode::complete_utf8_prefix("ab\xF0\x9F\x99"), 2u);  // 4-byte emoji, 3 present
  EXPECT_EQ(unicode::complete_utf8_prefix("ab\xE6\x97\xA5"), 5u);  // whole
  EXPECT_EQ(unicode::complete_utf8_prefix("ab\xE6x"), 4u);         // cannot finish: give it out
  EXPECT_EQ(unicode::complete_utf8_prefix("\x97"), 1u);            // stray continuation byte
  EXPECT_EQ(unicode::complete_utf8_prefix(""), 0u);
}

TEST(TokenizerUnicode, CharacterClasses) {
  char32_t cp;
  EXPECT_EQ(unicode::decode_utf8("\xE6\x97\xA5", 0, &cp), 3u);
  EXPECT_EQ(cp, 0x65E5u);
  EXPECT_TRUE(unicode::is_letter(0x65E5));  // 日 (Lo)
  EXPECT_TRUE(unicode::is_letter(0xE9));    // é (Ll)
  EXPECT_TRUE(unicode::is_letter(0x3A9));   // Ω (Lu)
  EXPECT_FALSE(unicode::is_letter(0x301));  // combining acute (Mn)
  EXPECT_FALSE(unicode::is_letter('1'));
  EXPECT_TRUE(unicode::is_number(0x663));   // ٣ ARABIC-INDIC DIGIT THREE (Nd)
  EXPECT_TRUE(unicode::is_number(0xBD));    // ½ (No)
  EXPECT_TRUE(unicode::is_number(0x2163));  // Ⅳ (Nl)
  EXPECT_FALSE(unicode::is_number('x'));
  EXPECT_TRUE(unicode::is_whitespace(0x3000));
  EXPECT_TRUE(unicode::is_whitespace('\n'));
  EXPECT_FALSE(unicode::is_whitespace(0x200B));  // zero width space is not White_Space
  EXPECT_FALSE(unicode::is_letter(unicode::kInvalid));
}

TEST(TokenizerByteLevel, Gpt2ByteToUnicodeMap) {
  ByteLevelMap map;
  EXPECT_EQ(map.encode_byte(' '), "\xC4\xA0");   // Ġ U+0120
  EXPECT_EQ(map.encode_byte('\n'), "\xC4\x8A");  // Ċ U+010A
  EXPECT_EQ(map.encode_byte(0), "\xC4\x80");     // U+0100: the first unprintable byte
  EXPECT_EQ(map.encode_byte(0xAD), "\xC5\x83");  // soft hyphen: 33 + 34 bytes before -> U+0143
  EXPECT_EQ(map.encode_byte('a'), "a");
  EXPECT_EQ(map.encode_byte(0xE9), "\xC3\xA9");  // printable Latin-1 keeps its code point
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  EXPECT_EQ(map.decode(map.encode(all)), all);
}

// ---------------------------------------------------------------------------------------------
// Pre-split patterns (bpe_split.h, PCRE2), expected splits worked out from the regexes.

using Words = std::vector<std::string>;
Words split(std::string_view text, const SplitRegex& r) {
  Words out;
  for (std::string_view w : r.split(text)) out.emplace_back(w);
  return out;
}

// The patterns as tokenizer.json files spell them, written out here rather than taken from
// bpe_split.h, so that a typo there shows.
constexpr std::string_view kGpt2Text =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Text =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

TEST(TokenizerSplit, BuiltInPatternsAreTheFilesText) {
  EXPECT_EQ(kGpt2SplitRegex, kGpt2Text);
  EXPECT_EQ(kLlama3SplitRegex, kLlama3Text);
}

TEST(TokenizerSplit, Gpt2Pattern) {
  const SplitRegex p(kGpt2Text);
  EXPECT_EQ(split("Hello world's  end\n\nok 123abc!?", p),
            (Words{"Hello", " world", "'s", " ", " end", "\n", "\n", "ok", " 123", "abc", "!?"}));
  EXPECT_EQ(split("a   b", p), (Words{"a", "  ", " b"}));
  EXPECT_EQ(split("a  ", p), (Words{"a", "  "}));
  EXPECT_EQ(split("I'M \tfoo", p), (Words{"I", "'", "M", " ", "\t", "foo"}));
  EXPECT_EQ(split("1212", p), (Words{"1212"}));
  EXPECT_EQ(split("na\xC3\xAFve caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC", p),
            (Words{"na\xC3\xAFve", " caf\xC3\xA9", " \xE6\x97\xA5\xE6\x9C\xAC"}));
  EXPECT_EQ(split("x \xD9\xA3\xD9\xA3", p), (Words{"x", " \xD9\xA3\xD9\xA3"}));  // Arabic digits
  EXPECT_EQ(split("", p), Words{});
}

TEST(TokenizerSplit, Llama3Pattern) {
  const SplitRegex p(kLlama3Text);
  EXPECT_EQ(split("Hello world's  end\n\nok 123abc!?", p),
            (Words{"Hello", " world", "'s", " ", " end", "\n\n", "ok", " ", "123", "abc", "!?"}));
  EXPECT_EQ(split("I'M \tfoo", p), (Words{"I", "'M", " ", "\tfoo"}));  // case-insensitive 'm
  EXPECT_EQ(split("1234567", p), (Words{"123", "456", "7"}));
  EXPECT_EQ(split("x.\n\ny", p), (Words{"x", ".\n\n", "y"}));
  EXPECT_EQ(split("a \n b", p), (Words{"a", " \n", " b"}));
  EXPECT_EQ(split("a   b", p), (Words{"a", "  ", " b"}));
  EXPECT_EQ(split("(hi)", p), (Words{"(hi", ")"}));  // one non-letter may lead a word
}

// Against the real regexes: split_golden.json holds random strings split by Python's `regex`
// module (make_split_golden.py beside it): GPT-2's, LLaMA-3's, and GPT-4o's pattern, a third one
// that the hand-written splitter this replaced could not run (camel-case words, contractions
// glued to the word, \p{Lu}/\p{Ll}/\p{M} classes).
TEST(TokenizerSplit, MatchesRegexModuleOnGoldenStrings) {
  const std::string file =
      std::string(PARALLM_SOURCE_DIR) + "/tests/model/fixtures/tokenizer/split_golden.json";
  std::ifstream in(file);
  ASSERT_TRUE(in) << file;
  const json golden = json::parse(in);
  ASSERT_GE(golden["cases"].size(), 400u);
  const SplitRegex gpt2(kGpt2Text), llama3(kLlama3Text);
  const SplitRegex o200k(golden["o200k_regex"].get<std::string>());
  // The LLaMA-3 pattern as converters that avoid (?i) spell it: the same splits.
  const SplitRegex llama3_spelled(
      R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)");
  int o200k_differs = 0;
  for (const json& c : golden["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(split(text, gpt2), c["gpt2"].get<Words>()) << json(text).dump();
    EXPECT_EQ(split(text, llama3), c["llama3"].get<Words>()) << json(text).dump();
    EXPECT_EQ(split(text, llama3_spelled), c["llama3"].get<Words>()) << json(text).dump();
    EXPECT_EQ(split(text, o200k), c["o200k"].get<Words>()) << json(text).dump();
    o200k_differs += c["o200k"] != c["llama3"];
  }
  EXPECT_GT(o200k_differs, 100);  // the third pattern is not the LLaMA-3 one in disguise
}

TEST(TokenizerSplit, Gpt4oPatternByHand) {
  const json golden = json::parse(std::ifstream(
      std::string(PARALLM_SOURCE_DIR) + "/tests/model/fixtures/tokenizer/split_golden.json"));
  const SplitRegex p(golden["o200k_regex"].get<std::string>());
  // An upper-case run then lower-case letters make a word; the contraction stays on it.
  EXPECT_EQ(split("HelloWorld's XMLHttp", p), (Words{"Hello", "World's", " XMLHttp"}));
  // '/' and newlines after punctuation stay with it.
  EXPECT_EQ(split("a//\nb 12345", p), (Words{"a", "//\n", "b", " ", "123", "45"}));
  // A combining mark (U+0301) is part of the word.
  EXPECT_EQ(split("Cafe\xCC\x81 ok", p), (Words{"Cafe\xCC\x81", " ok"}));
}

// What Hugging Face's "Isolated" Split does with patterns that do not cover the text: the runs
// between matches are pieces too, empty matches only cut, a String pattern is literal.
TEST(TokenizerSplit, RunsBetweenMatchesEmptyMatchesAndStrings) {
  EXPECT_EQ(split("ab, cd!", SplitRegex(R"(\p{L}+)")), (Words{"ab", ", ", "cd", "!"}));
  EXPECT_EQ(split("1234", SplitRegex(R"(\p{N})")), (Words{"1", "2", "3", "4"}));  // Qwen2's digits
  EXPECT_EQ(split("ab12cd", SplitRegex(R"((?=\d))")), (Words{"ab", "1", "2cd"}));
  EXPECT_EQ(split("x\xE6\x97\xA5y", SplitRegex(R"((?=\p{L}))")),
            (Words{"x", "\xE6\x97\xA5", "y"}));  // cuts between characters, not inside one
  EXPECT_EQ(split("a.b.c", SplitRegex(".", true, "test")), (Words{"a", ".", "b", ".", "c"}));
  EXPECT_EQ(split("a.b.c", SplitRegex(".", false, "test")), (Words{"a", ".", "b", ".", "c"}));
  EXPECT_EQ(split("a+b", SplitRegex("a+", true, "test")), (Words{"a+", "b"}));
  // Bytes that are not UTF-8 match nothing and stay, between the matches around them.
  EXPECT_EQ(split("ab\xFF\xFE"
                  "cd",
                  SplitRegex(kGpt2Text)),
            (Words{"ab", "\xFF\xFE", "cd"}));
  EXPECT_EQ(split("!\xFF?", SplitRegex(kGpt2Text)), (Words{"!", "\xFF", "?"}));
}

TEST(TokenizerSplit, BadRegexNamesWhereAndWhy) {
  const std::string msg =
      error_of<std::invalid_argument>([] { SplitRegex(R"((\p{L}+)", false, "tok.json: field"); });
  EXPECT_NE(msg.find("tok.json: field"), std::string::npos) << msg;
  EXPECT_NE(msg.find(R"((\p{L}+)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("offset"), std::string::npos) << msg;
}

// PCRE2's classes against the Unicode tables the rest of the tokenizer uses (tokenizer_unicode.h),
// over every code point: x + c + x splits into three pieces exactly when c is in the class.
TEST(TokenizerSplit, Pcre2ClassesAgreeWithUnicodeTables) {
  const SplitRegex space(R"(\s)"), letter(R"(\p{L})"), number(R"(\p{N})");
  int checked = 0;
  for (char32_t cp = 0; cp < 0x110000; ++cp) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    // U+180E MONGOLIAN VOWEL SEPARATOR: white space before Unicode 6.3, still in PCRE2's \s.
    if (cp == 0x180E) continue;
    std::string c;
    unicode::append_utf8(c, cp);
    ASSERT_EQ(space.split("x" + c + "x").size() == 3, unicode::is_whitespace(cp))
        << std::hex << uint32_t(cp);
    ASSERT_EQ(letter.split("!" + c + "!").size() == 3, unicode::is_letter(cp))
        << std::hex << uint32_t(cp);
    ASSERT_EQ(number.split("!" + c + "!").size() == 3, unicode::is_number(cp))
        << std::hex << uint32_t(cp);
    ++checked;
  }
  EXPECT_EQ(checked, 0x110000 - 0x800 - 1);
}

// ---------------------------------------------------------------------------------------------
// BpeModel against the textbook loop (GPT-2's bpe()): merge every occurrence of the lowest-ranked
// adjacent pair, left to right, until no adjacent pair has a merge.

Words naive_bpe(Words symbols, const std::map<std::pair<std::string, std::string>, int>& ranks) {
  while (symbols.size() > 1) {
    int best = INT32_MAX;
    std::pair<std::string, std::string> best_pair;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = ranks.find({symbols[i], symbols[i + 1]});
      if (it != ranks.end() && it->second < best) best = it->second, best_pair = it->first;
    }
    if (best == INT32_MAX) break;
    Words merged;
    for (size_t i = 0; i < symbols.size(); ++i) {
      if (i + 1 < symbols.size() && symbols[i] == best_pair.first &&
          symbols[i + 1] == best_pair.second) {
        merged.push_back(symbols[i] + symbols[i + 1]);
        ++i;
      } else {
        merged.push_back(symbols[i]);
      }
    }
    symbols = std::move(merged);
  }
  return symbols;
}

TEST(TokenizerBpe, MatchesTextbookLoopOnRandomMerges) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    // Merges as training makes them: each joins two tokens that already exist.
    Words tokens = {"a", "b", "c", "d"};
    TokenMap vocab;
    for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = static_cast<int32_t>(i);
    std::vector<std::pair<std::string, std::string>> merges;
    std::map<std::pair<std::string, std::string>, int> ranks;
    while (merges.size() < 40) {
      const std::string x = tokens[rng() % tokens.size()], y = tokens[rng() % tokens.size()];
      if (x.size() + y.size() > 6 || ranks.count({x, y})) continue;
      ranks[{x, y}] = static_cast<int>(merges.size());
      merges.emplace_back(x, y);
      if (!vocab.count(x + y)) {
        vocab[x + y] = static_cast<int32_t>(tokens.size());
        tokens.push_back(x + y);
      }
    }
    const BpeModel bpe(vocab, merges, BpeOptions{}, "random");
    for (int w = 0; w < 30; ++w) {
      std::string word;
      Words chars;
      for (size_t n = 1 + rng() % 24; n > 0; --n) {
        chars.emplace_back(1, static_cast<char>('a' + rng() % 4));
        word += chars.back();
      }
      Ids ids;
      bpe.encode_word(word, ids);
      Words got;
      for (int32_t id : ids) got.push_back(tokens[id]);
      ASSERT_EQ(got, naive_bpe(chars, ranks)) << "trial " << trial << " word " << word;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// sentencepiece: a BPE model with byte fallback, trained here, LLaMA-like options.

class SentenceIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit SentenceIterator(const std::vector<std::string>& lines) : lines_(lines) {}
  bool done() const override { return i_ >= lines_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return lines_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& lines_;
  size_t i_ = 0;
};

class SentencePieceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    // A small English-like corpus from a fixed word list: ASCII only, so that every non-ASCII
    // character later has to go through byte fallback.
    const char* words[] = {"the",   "model",   "runs",   "on",       "many", "ranks",
                           "and",   "each",    "rank",   "holds",    "a",    "slice",
                           "of",    "weights", "tensor", "pipeline", "data", "parallel",
                           "token", "text",    "hello",  "world",    "42",   "7"};
    std::vector<std::string> lines;
    uint32_t state = 12345;
    for (int l = 0; l < 400; ++l) {
      std::string line;
      for (int w = 0; w < 8; ++w) {
        state = state * 1664525u + 1013904223u;
        if (w) line += (state >> 28) == 0 ? ", " : " ";
        line += words[(state >> 8) % std::size(words)];
      }
      lines.push_back(line + ".");
    }
    SentenceIterator it(lines);
    const auto status =
        sentencepiece::SentencePieceTrainer::Train({{"model_prefix", dir_->file("tokenizer")},
                                                    {"model_type", "bpe"},
                                                    {"vocab_size", "400"},
                                                    {"byte_fallback", "true"},
                                                    {"character_coverage", "1.0"},
                                                    {"normalization_rule_name", "identity"},
                                                    {"remove_extra_whitespaces", "false"},
                                                    {"split_digits", "true"},
                                                    {"num_threads", "1"},
                                                    {"minloglevel", "2"}},
                                                   &it);
    ASSERT_TRUE(status.ok()) << status.ToString();
    model_file_ = dir_->file("tokenizer.model");
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(fs::exists(model_file_));
    tok_ = load_tokenizer_file(model_file_);
  }

  static TempDir* dir_;
  static std::string model_file_;
  std::unique_ptr<Tokenizer> tok_;
};
TempDir* SentencePieceTest::dir_ = nullptr;
std::string SentencePieceTest::model_file_;

TEST_F(SentencePieceTest, VocabularyAndSpecialIds) {
  EXPECT_EQ(tok_->vocab_size(), 400);
  EXPECT_EQ(tok_->bos_id(), 1);  // sentencepiece defaults: <unk> 0, <s> 1, </s> 2
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->eos_ids(), Ids{2});
  EXPECT_EQ(tok_->id_to_piece(1), "<s>");
  EXPECT_EQ(tok_->piece_to_id("<0x41>"), tok_->piece_to_id("<0x40>") + 1);
  EXPECT_EQ(tok_->piece_to_id("no such piece"), -1);
}

TEST_F(SentencePieceTest, RoundTripsTextIncludingBytesFallback) {
  for (const std::string text :
       {"hello world", "the model runs on many ranks.", "  two  spaces",
        "tensor parallel, pipeline parallel", "h\xC3\xA9llo w\xC3\xB6rld",
        "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E text \xF0\x9F\x99\x82", "line\nbreak\ttab", "1234"}) {
    const Ids ids = tok_->encode(text, false);
    ASSERT_FALSE(ids.empty()) << text;
    for (int32_t id : ids) ASSERT_TRUE(id >= 3 && id < 400) << text;  // no <unk>/<s>/</s>
    EXPECT_EQ(tok_->decode(ids), text);
  }
  // Characters the corpus never saw become one <0xNN> piece per UTF-8 byte.
  const Ids ids = tok_->encode("\xE6\x97\xA5", false);  // 日 = E6 97 A5
  Words pieces;
  for (int32_t id : ids) pieces.push_back(tok_->id_to_piece(id));
  EXPECT_EQ(pieces, (Words{"\xE2\x96\x81", "<0xE6>", "<0x97>", "<0xA5>"}));
}

TEST_F(SentencePieceTest, LearnedMergesMakeFewerTokensThanCharacters) {
  const std::string text = "the model runs on many ranks";
  EXPECT_LT(tok_->encode(text, false).size(), text.size() / 2);
}

TEST_F(SentencePieceTest, BosHandling) {
  const Ids plain = tok_->encode("hello world", false);
  const Ids with_bos = tok_->encode("hello world", true);
  ASSERT_EQ(with_bos.size(), plain.size() + 1);
  EXPECT_EQ(with_bos[0], 1);
  EXPECT_EQ(Ids(with_bos.begin() + 1, with_bos.end()), plain);
  // BOS and EOS produce no text; "<s>" written in the text is plain text for sentencepiece.
  Ids framed = with_bos;
  framed.push_back(2);
  EXPECT_EQ(tok_->decode(framed), "hello world");
  EXPECT_EQ(tok_->decode(tok_->encode("<s>", false)), "<s>");
  EXPECT_EQ(tok_->encode("", true), Ids{1});
}

TEST_F(SentencePieceTest, StreamingConcatenatesToDecode) {
  for (const std::string text : {"hello world", " leading space", "h\xC3\xA9llo",
                                 "\xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x99\x82!"}) {
    Ids ids = tok_->encode(text, true);
    ids.push_back(2);
    const Streamed s = stream(*tok_, ids);
    EXPECT_EQ(s.raw, tok_->decode(ids)) << text;
    EXPECT_EQ(s.text, tok_->decode(ids)) << text;
    EXPECT_TRUE(s.every_push_valid) << text;
  }
  // 日 arrives as three byte tokens: the streamer holds back the first two.
  const Ids ids = tok_->encode("\xE6\x97\xA5", false);
  const Streamed s = stream(*tok_, ids);
  EXPECT_EQ(s.text, "\xE6\x97\xA5");
  EXPECT_GE(s.held_back, 2);
  // The word after BOS loses its dummy-prefix space, a later one keeps it.
  const Ids hw = tok_->encode("hello", false);
  EXPECT_EQ(tok_->decode_token(1, hw[0]).substr(0, 1), "h");
  EXPECT_EQ(tok_->decode_token(hw.back(), hw[0]).substr(0, 2), " h");
}

TEST_F(SentencePieceTest, Errors) {
  EXPECT_NE(error_of<std::invalid_argument>([&] {
              tok_->decode({5, 400});
            }).find("400"),
            std::string::npos);
  EXPECT_NE(error_of<std::invalid_argument>([&] { tok_->decode_token(-1, -3); }).find("-3"),
            std::string::npos);
  TempDir dir;
  const std::string missing = dir.file("missing.model");
  EXPECT_NE(error_of<std::runtime_error>([&] { load_tokenizer_file(missing); }).find(missing),
            std::string::npos);
  const std::string garbage = dir.write("garbage.model", "this is not a protobuf");
  const std::string msg = error_of<std::runtime_error>([&] { load_tokenizer_file(garbage); });
  EXPECT_NE(msg.find(garbage), std::string::npos) << msg;
  EXPECT_NE(msg.find("[tokenizer]"), std::string::npos) << msg;
  const std::string txt = dir.write("vocab.txt", "a\nb\n");
  EXPECT_NE(error_of<std::invalid_argument>([&] { load_tokenizer_file(txt); }).find(".txt"),
            std::string::npos);
}

TEST_F(SentencePieceTest, LoadTokenizerFindsItBesideTheModel) {
  TempDir dir;
  EXPECT_EQ(load_tokenizer(dir.path()), nullptr);
  fs::copy_file(model_file_, dir.file("tokenizer.model"));
  dir.write("config.json", "{}");
  for (const std::string& p : {dir.path(), dir.file("config.json")}) {
    auto tok = load_tokenizer(p);
    ASSERT_NE(tok, nullptr) << p;
    EXPECT_EQ(tok->encode("hello world", true), tok_->encode("hello world", true));
  }
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json, sentencepiece-style (LLaMA-2 / Mistral shape).
//
// Vocabulary: 0 <unk>, 1 <s>, 2 </s>, 3..258 <0x00>..<0xFF> (byte b has id 3 + b),
// 259 ▁, 260 a, 261 b, 262 c, 263 ▁a, 264 ab, 265 ▁ab, 266 ▁c, 267 ca.
// Merges by rank: 0 "▁ a", 1 "a b", 2 "▁a b", 3 "▁ c", 4 "c a".
constexpr int32_t kSp = 259, kB = 261, kSpA = 263, kAB = 264, kSpAB = 265, kSpC = 266;
int32_t byte_id(unsigned char b) {
  return 3 + b;
}
const std::string& kMeta = testing::kSpmSpace;  // ▁

json spm_style_json() {
  json vocab = json::object();
  vocab["<unk>"] = 0;
  vocab["<s>"] = 1;
  vocab["</s>"] = 2;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  const std::vector<std::string> rest = {kMeta, "a",          "b",         "c", kMeta + "a",
                                         "ab",  kMeta + "ab", kMeta + "c", "ca"};
  for (size_t i = 0; i < rest.size(); ++i) vocab[rest[i]] = 259 + static_cast<int>(i);
  json added = json::array();
  const char* specials[] = {"<unk>", "<s>", "</s>"};
  for (int i = 0; i < 3; ++i) added.push_back(testing::special_added_token(i, specials[i]));
  return testing::llama_style_tokenizer_json(
      added, vocab,
      json::array({kMeta + " a", "a b", kMeta + "a b", kMeta + " c", "c a"}));  // "a b" strings
}

std::unique_ptr<Tokenizer> load_json(const TempDir& dir, const json& j,
                                     const std::string& name = "tokenizer.json") {
  return load_tokenizer_file(dir.write(name, j.dump(1)));
}

TEST(HfSentencePieceStyle, ExactIdsByMergeRank) {
  TempDir dir;
  auto tok = load_json(dir, spm_style_json());
  EXPECT_EQ(tok->vocab_size(), 268);
  // "ab" -> ▁ a b; (▁,a) rank 0 first -> ▁a b; (▁a,b) rank 2 -> ▁ab.
  EXPECT_EQ(tok->encode("ab", false), Ids{kSpAB});
  // "cab" -> ▁ c a b; (a,b) rank 1 -> ▁ c ab; (▁,c) rank 3 -> ▁c ab; (c,a) went stale.
  EXPECT_EQ(tok->encode("cab", false), (Ids{kSpC, kAB}));
  // "a b" -> ▁a▁b: only (▁,a) merges.
  EXPECT_EQ(tok->encode("a b", false), (Ids{kSpA, kSp, kB}));
  // Prepend always adds a ▁, even before a space: " ab" -> ▁ ▁ a b -> ▁ ▁a b -> ▁ ▁ab.
  EXPECT_EQ(tok->encode(" ab", false), (Ids{kSp, kSpAB}));
  // "ab cab" -> ▁ab ▁c ab (the same merges inside one long word).
  EXPECT_EQ(tok->encode("ab cab", false), (Ids{kSpAB, kSpC, kAB}));
  // é is not in the vocabulary: byte fallback to <0xC3> <0xA9>.
  EXPECT_EQ(tok->encode("\xC3\xA9", false), (Ids{kSp, byte_id(0xC3), byte_id(0xA9)}));
  EXPECT_EQ(tok->encode("", false), Ids{});
  EXPECT_EQ(tok->encode("", true), Ids{1});
}

TEST(HfSentencePieceStyle, BosSpecialTokensAndDecode) {
  TempDir dir;
  auto tok = load_json(dir, spm_style_json());
  EXPECT_EQ(tok->bos_id(), 1);  // from the post_processor template
  EXPECT_EQ(tok->eos_id(), 2);  // no config.json: the token named </s>
  EXPECT_EQ(tok->encode("ab", true), (Ids{1, kSpAB}));
  // Special tokens in the text are matched first; Prepend applies to each piece of text between.
  EXPECT_EQ(tok->encode("<s>ab</s>", false), (Ids{1, kSpAB, 2}));
  EXPECT_EQ(tok->encode("ab</s>b", false), (Ids{kSpAB, 2, kSp, kB}));
  EXPECT_EQ(tok->decode({1, kSpAB, kSpC, kAB, 2}), "ab cab");
  EXPECT_EQ(tok->decode({kSp, kSpAB}), " ab");
  for (const std::string text :
       {"ab cab", " ab  c", "a\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x99\x82", "xyz\n", "cabbage"}) {
    EXPECT_EQ(tok->decode(tok->encode(text, true)), text);
    Ids ids = tok->encode(text, true);
    ids.push_back(2);
    const Streamed s = stream(*tok, ids);
    EXPECT_EQ(s.raw, text);
    EXPECT_EQ(s.text, text);
    EXPECT_TRUE(s.every_push_valid);
  }
  // Bytes that cannot form UTF-8 decode to U+FFFD, in decode() and through the streamer alike.
  const Ids broken = {kSpA, byte_id(0xE6), byte_id(0x97), kB};
  EXPECT_EQ(tok->decode(broken),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(stream(*tok, broken).text,
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(tok->id_to_piece(kSpAB), kMeta + "ab");
  EXPECT_EQ(tok->piece_to_id("</s>"), 2);
}

TEST(HfSentencePieceStyle, UnknownTokenWithoutByteFallback) {
  TempDir dir;
  json j = spm_style_json();
  j["model"]["byte_fallback"] = false;
  auto tok = load_json(dir, j);
  // é and ü are unknown; fuse_unk makes one <unk> of the run.
  EXPECT_EQ(tok->encode("a\xC3\xA9\xC3\xBC", false), (Ids{kSpA, 0}));
  j["model"]["fuse_unk"] = false;
  tok = load_json(dir, j);
  EXPECT_EQ(tok->encode("a\xC3\xA9\xC3\xBC", false), (Ids{kSpA, 0, 0}));
  j["model"]["unk_token"] = nullptr;
  tok = load_json(dir, j);
  EXPECT_NE(
      error_of<std::invalid_argument>([&] { tok->encode("\xC3\xA9", false); }).find("\xC3\xA9"),
      std::string::npos);
}

TEST(HfSentencePieceStyle, MetaspacePreTokenizerAndPairMerges) {
  TempDir dir;
  json j = spm_style_json();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", "first"}, {"split", false}};
  json pairs = json::array();
  for (const json& merge : j["model"]["merges"]) {
    const std::string m = merge.get<std::string>();
    const size_t sp = m.find(' ');
    pairs.push_back(json::array({m.substr(0, sp), m.substr(sp + 1)}));
  }
  j["model"]["merges"] = pairs;  // [a, b] pairs, as newer tokenizers write them
  auto tok = load_json(dir, j);
  EXPECT_EQ(tok->encode("ab cab", false), (Ids{kSpAB, kSpC, kAB}));
  // Metaspace prepends only when the text does not already start with ▁.
  EXPECT_EQ(tok->encode(" ab", false), Ids{kSpAB});
  // prepend_scheme "first": only the text at offset 0 gets the ▁.
  EXPECT_EQ(tok->encode("<s>ab", false), (Ids{1, kAB}));
  EXPECT_EQ(tok->decode(tok->encode("ab cab", true)), "ab cab");
  // split: true cuts before every ▁, so "▁a▁b" merges nothing across words: same ids here.
  j["pre_tokenizer"]["split"] = true;
  tok = load_json(dir, j);
  EXPECT_EQ(tok->encode("ab ab", false), (Ids{kSpAB, kSpAB}));
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json, byte-level (LLaMA-3 / GPT-2 shape).
//
// Vocabulary: ids 0..255 are the byte-level characters of bytes 0..255 (so byte b has id b),
// 256 Ġt, 257 he, 258 Ġthe, 259 in, 260 Ġa, 261 12, 262 Ġxyz (reachable by no merge);
// added: 263 <|begin_of_text|>, 264 <|end_of_text|>, 265 <|eot_id|> (special), 266 "<tool>"
// (not special, rstrip). Merges: 0 (Ġ,t) 1 (h,e) 2 (Ġt,he) 3 (i,n) 4 (Ġ,a) 5 (1,2).
const char* kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

json byte_level_json() {
  ByteLevelMap map;
  const std::string G = map.encode_byte(' ');  // Ġ
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[map.encode_byte(static_cast<unsigned char>(b))] = b;
  const std::vector<std::string> rest = {G + "t", "he", G + "the", "in", G + "a", "12", G + "xyz"};
  for (size_t i = 0; i < rest.size(); ++i) vocab[rest[i]] = 256 + static_cast<int>(i);
  json j;
  j["added_tokens"] = json::array();
  const char* specials[] = {"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"};
  for (int i = 0; i < 3; ++i) {
    j["added_tokens"].push_back({{"id", 263 + i},
                                 {"content", specials[i]},
                                 {"special", true},
                                 {"normalized", false},
                                 {"lstrip", false},
                                 {"rstrip", false},
                                 {"single_word", false}});
  }
  j["added_tokens"].push_back({{"id", 266},
                               {"content", "<tool>"},
                               {"special", false},
                               {"normalized", false},
                               {"lstrip", false},
                               {"rstrip", true},
                               {"single_word", false}});
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"},
                           {"pattern", {{"Regex", kLlama3Regex}}},
                           {"behavior", "Isolated"},
                           {"invert", false}},
                          {{"type", "ByteLevel"},
                           {"add_prefix_space", false},
                           {"trim_offsets", true},
                           {"use_regex", false}}}}};
  j["post_processor"] = {{"type", "Sequence"},
                         {"processors",
                          {{{"type", "ByteLevel"},
                            {"add_prefix_space", true},
                            {"trim_offsets", false},
                            {"use_regex", true}},
                           {{"type", "TemplateProcessing"},
                            {"single",
                             {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                            {"special_tokens",
                             {{"<|begin_of_text|>",
                               {{"id", "<|begin_of_text|>"},
                                {"ids", json::array({263})},
                                {"tokens", json::array({"<|begin_of_text|>"})}}}}}}}}};
  j["decoder"] = {{"type", "ByteLevel"},
                  {"add_prefix_space", true},
                  {"trim_offsets", true},
                  {"use_regex", true}};
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"ignore_merges", true},
                {"vocab", vocab},
                {"merges", json::array({json::array({G, "t"}), json::array({"h", "e"}),
                                        json::array({G + "t", "he"}), json::array({"i", "n"}),
                                        json::array({G, "a"}), json::array({"1", "2"})})}};
  return j;
}

TEST(HfByteLevel, Llama3ExactIds) {
  TempDir dir;
  auto tok = load_json(dir, byte_level_json());
  EXPECT_EQ(tok->vocab_size(), 267);
  EXPECT_EQ(tok->bos_id(), 263);
  EXPECT_EQ(tok->eos_id(), 264);  // no config.json: the token named <|end_of_text|>
  // "the in" -> words "the", " in"; t (h,e) -> t he; Ġ (i,n) -> Ġ in.
  EXPECT_EQ(tok->encode("the in", false), (Ids{'t', 257, ' ', 259}));
  // " the" -> Ġ t h e -> Ġt he -> Ġthe.
  EXPECT_EQ(tok->encode(" the", false), Ids{258});
  // ignore_merges: " xyz" is in the vocabulary as a whole word although no merge makes it.
  EXPECT_EQ(tok->encode(" xyz", false), Ids{262});
  // Numbers in groups of up to three: "1212" -> "121" "2" -> 12 1, 2.
  EXPECT_EQ(tok->encode("1212", false), (Ids{261, '1', '2'}));
  // é = C3 A9: printable Latin-1 bytes, each its own character.
  EXPECT_EQ(tok->encode("\xC3\xA9", false), (Ids{0xC3, 0xA9}));
  EXPECT_EQ(tok->encode("a\n\nb", false), (Ids{'a', '\n', '\n', 'b'}));
  // Added tokens: matched before the split, BOS from the template; rstrip eats the spaces after.
  EXPECT_EQ(tok->encode("<|begin_of_text|>the<|eot_id|>", false), (Ids{263, 't', 257, 265}));
  EXPECT_EQ(tok->encode("the", true), (Ids{263, 't', 257}));
  EXPECT_EQ(tok->encode("a<tool>  the", false), (Ids{'a', 266, 't', 257}));
  EXPECT_EQ(tok->encode("<|eot_id", false).size(), 8u);  // unfinished: plain text
}

TEST(HfByteLevel, WithoutIgnoreMergesAndWithGpt2Split) {
  TempDir dir;
  json j = byte_level_json();
  j["model"]["ignore_merges"] = false;
  auto tok = load_json(dir, j);
  EXPECT_EQ(tok->encode(" xyz", false), (Ids{' ', 'x', 'y', 'z'}));
  // GPT-2: ByteLevel with its built-in regex; numbers are not cut into threes.
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  tok = load_json(dir, j);
  EXPECT_EQ(tok->encode("1212", false), (Ids{261, 261}));
  EXPECT_EQ(tok->encode("the in", false), (Ids{'t', 257, ' ', 259}));
  j["pre_tokenizer"]["add_prefix_space"] = true;
  tok = load_json(dir, j);
  EXPECT_EQ(tok->encode("the", false), Ids{258});  // " the"
}

// Any Split regex runs, compiled once at load: Qwen2's pattern is LLaMA-3's with single digits
// (\p{N} instead of \p{N}{1,3}), which keeps "12" from merging; a String pattern cuts at a literal.
TEST(HfByteLevel, AnySplitPattern) {
  TempDir dir;
  json j = byte_level_json();
  std::string qwen2 = kLlama3Regex;
  const size_t at = qwen2.find(R"(\p{N}{1,3})");
  ASSERT_NE(at, std::string::npos);
  qwen2.replace(at, std::string(R"(\p{N}{1,3})").size(), R"(\p{N})");
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = qwen2;
  auto tok = load_json(dir, j);
  EXPECT_EQ(tok->encode("1212", false), (Ids{'1', '2', '1', '2'}));
  EXPECT_EQ(tok->encode("the in", false), (Ids{'t', 257, ' ', 259}));  // words as with LLaMA-3
  // {"String": "e"}: pieces "th", "e", " in": no "he" merge across the cut, " in" -> Ġ in.
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"String", "e"}};
  tok = load_json(dir, j);
  EXPECT_EQ(tok->encode("the in", false), (Ids{'t', 'h', 'e', ' ', 259}));
  EXPECT_EQ(tok->decode(tok->encode("the in", false)), "the in");
}

TEST(HfByteLevel, RoundTripAndStreaming) {
  TempDir dir;
  auto tok = load_json(dir, byte_level_json());
  for (const std::string text :
       {"the in the", "  leading spaces",
        "h\xC3\xA9llo \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x99\x82", "x.\n\ny 1234567",
        "a<tool>b"}) {
    const Ids ids = tok->encode(text, false);
    EXPECT_EQ(tok->decode(ids), text);
    Ids framed = tok->encode(text, true);
    framed.push_back(265);
    EXPECT_EQ(tok->decode(framed), text);  // specials decode to nothing
    const Streamed s = stream(*tok, framed);
    EXPECT_EQ(s.raw, text);
    EXPECT_EQ(s.text, text);
    EXPECT_TRUE(s.every_push_valid);
  }
  // 🙂 is four single-byte tokens: the first three are held back.
  const Streamed s = stream(*tok, tok->encode("\xF0\x9F\x99\x82", false));
  EXPECT_EQ(s.held_back, 3);
  EXPECT_EQ(s.text, "\xF0\x9F\x99\x82");
}

TEST(HfByteLevel, EosAndBosFromConfigFilesBeside) {
  TempDir dir;
  dir.write("config.json", R"({"bos_token_id": 263, "eos_token_id": [265, 264]})");
  dir.write("generation_config.json", R"({"eos_token_id": [264, 266]})");
  json j = byte_level_json();
  j["post_processor"] = nullptr;
  auto tok = load_json(dir, j);
  EXPECT_EQ(tok->bos_id(), 263);
  EXPECT_EQ(tok->eos_id(), 265);
  EXPECT_EQ(tok->eos_ids(), (Ids{265, 264, 266}));
  // load_tokenizer prefers tokenizer.json in the directory.
  auto found = load_tokenizer(dir.file("config.json"));
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(found->encode("the", true), (Ids{263, 't', 257}));
  // tokenizer_config.json names them when config.json does not.
  dir.write("config.json", "{}");
  dir.write("generation_config.json", "{}");
  dir.write("tokenizer_config.json",
            R"({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}})");
  tok = load_json(dir, j);
  EXPECT_EQ(tok->bos_id(), 263);
  EXPECT_EQ(tok->eos_id(), 265);
  // An id beyond the vocabulary is an error naming config.json.
  dir.write("config.json", R"({"eos_token_id": 999})");
  const std::string msg = error_of<std::invalid_argument>([&] { load_json(dir, j); });
  EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("999"), std::string::npos) << msg;
}

// Random strings over letters, digits, spaces, newlines, specials and multi-byte characters
// round-trip through both tokenizer.json shapes, and stream to the same text.
TEST(HfTokenizer, RandomRoundTrips) {
  const std::vector<std::string> alphabet = {"a",
                                             "b",
                                             "c",
                                             "t",
                                             "h",
                                             "e",
                                             "i",
                                             "n",
                                             "1",
                                             "2",
                                             " ",
                                             " ",
                                             "  ",
                                             "\n",
                                             "\t",
                                             "\r",
                                             "'s",
                                             ".",
                                             "\xC3\xA9",
                                             "\xE6\x97\xA5",
                                             "\xF0\x9F\x99\x82",
                                             "\xE2\x96\x81",
                                             "<s>",
                                             "<tool>",
                                             "\x01"};
  TempDir dir_spm, dir_bl;
  auto spm = load_json(dir_spm, spm_style_json());
  json bl_json = byte_level_json();
  bl_json["added_tokens"][3]["rstrip"] = false;  // "<tool>" would eat the spaces after it
  auto bl = load_json(dir_bl, bl_json);
  std::mt19937 rng(11);
  for (int i = 0; i < 300; ++i) {
    std::string text;
    for (size_t n = rng() % 16; n > 0; --n) text += alphabet[rng() % alphabet.size()];
    // Byte-level: every string comes back, with or without BOS.
    EXPECT_EQ(bl->decode(bl->encode(text, true)), text) << json(text).dump();
    EXPECT_EQ(stream(*bl, bl->encode(text, true)).text, text) << json(text).dump();
    // Sentencepiece-style: "<s>" is special there (decodes to nothing) and Prepend puts a "▁"
    // after it; a "▁" in the text decodes as a space. Compare only texts without them.
    if (text.find("<s>") != std::string::npos || text.find(kMeta) != std::string::npos) continue;
    EXPECT_EQ(spm->decode(spm->encode(text, true)), text) << json(text).dump();
    EXPECT_EQ(stream(*spm, spm->encode(text, true)).text, text) << json(text).dump();
  }
}

// ---------------------------------------------------------------------------------------------
// Bad tokenizer.json files: one clear message naming the file and what is wrong.

void expect_error(const TempDir& dir, const std::string& content,
                  const std::vector<std::string>& parts) {
  const std::string file = dir.write("tokenizer.json", content);
  const std::string msg = error_of<std::invalid_argument>([&] { load_tokenizer_file(file); });
  EXPECT_NE(msg.find(file), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg;
}

TEST(HfTokenizerErrors, NameTheFileAndTheField) {
  TempDir dir;
  const std::string missing = dir.file("nope/tokenizer.json");
  EXPECT_NE(error_of<std::runtime_error>([&] { load_tokenizer_file(missing); }).find(missing),
            std::string::npos);
  expect_error(dir, "{\"model\": {", {"invalid JSON"});
  expect_error(dir, "[1, 2]", {"JSON object"});

  json j = spm_style_json();
  j["model"]["type"] = "WordPiece";
  expect_error(dir, j.dump(), {"model.type", "WordPiece"});
  j["model"]["type"] = "Unigram";
  expect_error(dir, j.dump(), {"model.type", "Unigram"});

  j = spm_style_json();
  j["model"]["merges"].push_back("a zz");
  expect_error(dir, j.dump(), {"model.merges[5]", "\"zz\"", "model.vocab"});
  j = spm_style_json();
  j["model"]["merges"].push_back("b c");  // "bc" is not in the vocabulary
  expect_error(dir, j.dump(), {"model.merges[5]", "\"bc\""});
  j = spm_style_json();
  j["model"]["merges"].push_back("abc");
  expect_error(dir, j.dump(), {"model.merges[5]", "abc"});
  j = spm_style_json();
  j["model"]["vocab"]["zz"] = "seven";
  expect_error(dir, j.dump(), {"model.vocab[\"zz\"]", "seven"});
  j = spm_style_json();
  j["model"]["vocab"]["zz"] = int64_t{1} << 40;
  expect_error(dir, j.dump(), {"model.vocab[\"zz\"]", "1099511627776"});
  j = spm_style_json();
  j["model"]["unk_token"] = "<nope>";
  expect_error(dir, j.dump(), {"model.unk_token", "<nope>"});

  j = spm_style_json();
  j["normalizer"]["normalizers"].push_back({{"type", "NFKC"}});
  expect_error(dir, j.dump(), {"normalizer", "NFKC"});
  j = spm_style_json();
  j["normalizer"] = nullptr;
  expect_error(dir, j.dump(), {"Metaspace", "ByteLevel"});  // cannot tell the alphabet

  j = byte_level_json();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = R"(\w+|(\s+)";
  expect_error(dir, j.dump(),
               {"pre_tokenizer.pretokenizers[0].pattern", R"(\w+|(\s+)", "does not compile"});
  j = byte_level_json();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Nope", "x"}};
  expect_error(dir, j.dump(), {"pre_tokenizer.pretokenizers[0].pattern", "Nope"});
  j = byte_level_json();
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_error(dir, j.dump(), {"pre_tokenizer", "Whitespace"});
  j = byte_level_json();
  j["added_tokens"].push_back({{"content", "<x>"}});
  expect_error(dir, j.dump(), {"added_tokens[4]"});
  j = byte_level_json();
  j["model"]["byte_fallback"] = "yes";
  expect_error(dir, j.dump(), {"model.byte_fallback"});
  j = byte_level_json();
  j["pre_tokenizer"] = "ByteLevel";  // wrong JSON type somewhere deep
  expect_error(dir, j.dump(), {"[tokenizer]"});

  auto tok = load_json(dir, byte_level_json());
  EXPECT_NE(error_of<std::invalid_argument>([&] {
              tok->decode({1, 267});
            }).find("267"),
            std::string::npos);
}

}  // namespace
}  // namespace parallm
