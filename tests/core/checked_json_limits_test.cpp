// core/checked.h and core/json_limits.h: overflow named instead of wrapped; files read with a
// limit (regular files only); JSON depth bounded before parsing; previews that never recurse.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdint>
#include <fstream>
#include <limits>
#include <string>

#include "parallm/core/checked.h"
#include "parallm/core/json_limits.h"
#include "test_util.h"

namespace {

using parallm::testing::error_of;
using parallm::testing::TempDir;

TEST(Checked, MultipliesOrNamesTheOverflow) {
  EXPECT_EQ(parallm::checked_mul<int64_t>(int64_t(1) << 31, int64_t(1) << 31, "a x b"),
            int64_t(1) << 62);
  const std::string e = error_of(
      [] { parallm::checked_mul<int64_t>(int64_t(1) << 62, 4, "config.json: vocab x hidden"); });
  EXPECT_NE(e.find("[overflow] config.json: vocab x hidden: 4611686018427387904 x 4"),
            std::string::npos)
      << e;
  EXPECT_NE(error_of([] { parallm::checked_mul<int64_t>(-(int64_t(1) << 62), 4, "neg"); })
                .find("neg"),
            std::string::npos);
  EXPECT_EQ(parallm::checked_add<int64_t>(1, 2, "x"), 3);
  EXPECT_NE(error_of([] {
              parallm::checked_add<int64_t>(std::numeric_limits<int64_t>::max(), 1, "sum");
            }).find("sum"),
            std::string::npos);
  EXPECT_NE(error_of([] { parallm::checked_mul<uint32_t>(1u << 16, 1u << 16, "u32"); })
                .find("32 bits"),
            std::string::npos);
}

TEST(JsonLimits, DepthIsCheckedOutsideStrings) {
  EXPECT_EQ(error_of([] { parallm::check_json_depth("[[[]]]", 3, "t", "s"); }), "no error");
  const std::string e = error_of([] { parallm::check_json_depth("[[[[]]]]", 3, "t", "f.json"); });
  EXPECT_NE(e.find("[t] f.json: JSON nested deeper than 3 levels (at byte 3)"), std::string::npos)
      << e;
  // Brackets inside strings, escaped quotes included, do not count.
  EXPECT_EQ(error_of([] { parallm::check_json_depth(R"(["[[[[\"[[[["])", 1, "t", "s"); }),
            "no error");
  // 65k levels: refused before nlohmann builds (and a message would dump) the value.
  const std::string deep = std::string(65000, '[') + std::string(65000, ']');
  EXPECT_NE(error_of([&] { parallm::parse_json_text(deep, "t", "deep"); }).find("deeper than 256"),
            std::string::npos);
  EXPECT_EQ(parallm::parse_json_text(R"({"a": [1, {"b": 2}]})", "t", "s")["a"][1]["b"], 2);
  EXPECT_NE(error_of([] { parallm::parse_json_text("{", "t", "bad.json"); })
                .find("[t] bad.json: invalid JSON"),
            std::string::npos);
  EXPECT_NE(error_of([] { parallm::parse_json_text("[1e999]", "t", "big.json"); })
                .find("[t] big.json: invalid JSON"),
            std::string::npos);
}

TEST(JsonLimits, FilesAreReadWithALimit) {
  TempDir dir;
  std::ofstream(dir / "small.json") << R"({"x": 1})";
  EXPECT_EQ(parallm::read_json_file(dir / "small.json", "t")["x"], 1);
  std::ofstream(dir / "big.txt") << std::string(5000, 'x');
  EXPECT_EQ(parallm::read_text_file(dir / "big.txt", 5000, "t").size(), 5000u);
  EXPECT_NE(error_of([&] { parallm::read_text_file(dir / "big.txt", 4999, "t"); })
                .find("larger than the 4999 bytes"),
            std::string::npos);
  // Not regular files: refused at once (a FIFO would block in open, /dev/zero never ends).
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
  for (const std::string& path : {dir / "fifo", std::string("/dev/zero"), dir.path()}) {
    try {
      parallm::read_text_file(path, 1 << 20, "t");
      ADD_FAILURE() << path << " was read";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(parallm::read_text_file(dir / "missing", 10, "t"), std::runtime_error);
}

TEST(JsonLimits, PreviewNeverRecursesAndIsShort) {
  using nlohmann::json;
  EXPECT_EQ(parallm::json_preview(json::parse("[[1, 2], 3]")), "an array of 2 elements");
  EXPECT_EQ(parallm::json_preview(json::parse(R"({"a": {"b": 1}})")), "an object of 1 field");
  EXPECT_EQ(parallm::json_preview(json(2.5)), "2.5");
  EXPECT_EQ(parallm::json_preview(json(nullptr)), "null");
  EXPECT_EQ(parallm::json_preview(json("abc")), "\"abc\"");
  const std::string p = parallm::json_preview(json(std::string(100000, 'x')), 10);
  EXPECT_EQ(p, "\"xxxxxxxxxx\"... (100000 bytes)");
  // A cut never splits a UTF-8 character: "é" is 2 bytes.
  std::string accents;
  for (int i = 0; i < 30; ++i) accents += "\xc3\xa9";
  const std::string cut = parallm::json_preview(json(accents), 5);
  EXPECT_EQ(cut.substr(0, cut.find("...")), "\"\xc3\xa9\xc3\xa9\"") << cut;
  EXPECT_EQ(parallm::json_path(parallm::json_path("devices", 0), "mem_bw"), "devices[0].mem_bw");
  EXPECT_EQ(parallm::json_path("", "gpu"), "gpu");
}

}  // namespace
