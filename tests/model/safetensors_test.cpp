#include "parallm/model/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "parallm/model/mmap_file.h"
#include "parallm/model/weights.h"
#include "test_util.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed with everything in it.
using testing::TempDir;

// A [rows, cols] tensor of `dtype` whose element (r, c) is distinct and exactly representable in
// bf16 and f16: r * 0.25 - c * 0.5 + 0.125.
Tensor ramp(DType dtype, int64_t rows, int64_t cols) {
  Tensor f = Tensor::empty(DType::F32, {rows, cols});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      f.data<float>()[r * cols + c] =
          static_cast<float>(r) * 0.25f - static_cast<float>(c) * 0.5f + 0.125f;
  return f.to(dtype);
}

bool bytes_equal(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Writes a safetensors file by hand: `header` is the JSON text (unpadded), `data` the data section.
void write_raw(const std::string& path, const std::string& header, const std::string& data,
               int64_t header_len_override = -1) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n =
      header_len_override >= 0 ? static_cast<uint64_t>(header_len_override) : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << data;
}

using testing::error_of;

std::string open_error(const std::string& path) {
  return error_of([&] { open_safetensors(path); });
}

TEST(Safetensors, RoundTripsEveryDtypeAndConvertsOnRead) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  const Tensor f32 = ramp(DType::F32, 3, 5);
  const Tensor bf16 = ramp(DType::BF16, 4, 2);
  const Tensor f16 = ramp(DType::F16, 1, 7);
  write_safetensors(path, {{"a.f32", f32}, {"b.bf16", bf16}, {"c.f16", f16}},
                    {{"format", "pt"}, {"note", "x"}});
  auto src = open_safetensors(path);
  EXPECT_EQ(src->names(), (std::vector<std::string>{"a.f32", "b.bf16", "c.f16"}));
  EXPECT_EQ(src->info("b.bf16").dtype, DType::BF16);
  EXPECT_EQ(src->info("b.bf16").shape, (Shape{4, 2}));
  EXPECT_EQ(src->info("c.f16").dtype, DType::F16);
  EXPECT_TRUE(src->has("a.f32"));
  EXPECT_FALSE(src->has("a.f16"));
  for (const auto& [name, t] : std::vector<std::pair<std::string, Tensor>>{
           {"a.f32", f32}, {"b.bf16", bf16}, {"c.f16", f16}}) {
    for (DType want : {DType::F32, DType::BF16, DType::F16}) {
      Tensor got = src->read(name, want);
      EXPECT_TRUE(bytes_equal(got, t.to(want))) << name << " as " << dtype_name(want);
    }
  }
  EXPECT_EQ(read_safetensors_metadata(path),
            (std::map<std::string, std::string>{{"format", "pt"}, {"note", "x"}}));

  // The header is padded with spaces to a multiple of 8 and the data follow it in order.
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(fs::file_size(path), 8 + n + f32.nbytes() + bf16.nbytes() + f16.nbytes());
  std::string header(n, '\0');
  in.read(header.data(), static_cast<std::streamsize>(n));
  auto j = nlohmann::json::parse(header);
  EXPECT_EQ(j["a.f32"]["data_offsets"], nlohmann::json({0, 60}));
  EXPECT_EQ(j["b.bf16"]["data_offsets"], nlohmann::json({60, 76}));
  EXPECT_EQ(j["c.f16"]["dtype"], "F16");
  // No temporary file is left beside it.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

TEST(Safetensors, ScalarsAndEmptyTensorsRoundTrip) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  Tensor scalar = Tensor::empty(DType::F32, {});
  scalar.data<float>()[0] = 3.5f;
  Tensor empty = Tensor::empty(DType::BF16, {0, 4});
  write_safetensors(path, {{"s", scalar}, {"e", empty}, {"t", ramp(DType::F32, 2, 2)}});
  auto src = open_safetensors(path);
  EXPECT_EQ(src->read("s", DType::F32).data<float>()[0], 3.5f);
  EXPECT_EQ(src->read("e", DType::F32).shape(), (Shape{0, 4}));
  EXPECT_EQ(src->read("e", DType::F32, Slice::cols(1, 3)).shape(), (Shape{0, 2}));
  EXPECT_TRUE(bytes_equal(src->read("t", DType::F32), ramp(DType::F32, 2, 2)));
}

TEST(Safetensors, RowAndColumnSlicesEqualThePartsOfTheFullTensor) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  const Tensor w = ramp(DType::BF16, 12, 10);
  Tensor cube = ramp(DType::F16, 6, 12).reshape({6, 3, 4});
  write_safetensors(path, {{"pad", ramp(DType::F32, 1, 3)}, {"w", w}, {"cube", cube}});
  auto src = open_safetensors(path);
  for (DType want : {DType::F32, DType::BF16, DType::F16}) {
    const Tensor full = w.to(want);
    for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 12}, {3, 7}, {11, 12}, {5, 5}}) {
      Tensor rows = src->read("w", want, Slice::rows(b, e));
      EXPECT_TRUE(bytes_equal(rows, full.slice_rows(b, e).contiguous())) << b << ".." << e;
    }
    for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 10}, {2, 6}, {9, 10}, {4, 4}}) {
      Tensor cols = src->read("w", want, Slice::cols(b, e));
      EXPECT_EQ(cols.shape(), (Shape{12, e - b}));
      EXPECT_TRUE(bytes_equal(cols, full.slice_cols(b, e).contiguous())) << b << ".." << e;
    }
  }
  // Rows of a 3-D tensor carry their inner dimensions.
  Tensor r = src->read("cube", DType::F32, Slice::rows(2, 4));
  EXPECT_EQ(r.shape(), (Shape{2, 3, 4}));
  EXPECT_TRUE(bytes_equal(r, cube.to(DType::F32).slice_rows(2, 4).contiguous()));
}

TEST(Safetensors, BytesReadCountsOnlyTheSlice) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  write_safetensors(path, {{"w", ramp(DType::BF16, 16, 8)}, {"v", ramp(DType::F32, 4, 4)}});
  auto src = open_safetensors(path);
  EXPECT_EQ(src->bytes_read(), 0u);
  src->read("w", DType::F32, Slice::rows(4, 8));  // 4 rows x 8 x 2 bytes
  EXPECT_EQ(src->bytes_read(), 64u);
  src->read("w", DType::F32, Slice::cols(2, 5));  // 16 rows x 3 x 2 bytes
  EXPECT_EQ(src->bytes_read(), 64u + 96u);
  src->read("v", DType::BF16);  // 16 x 4 bytes, counted in the file's dtype
  EXPECT_EQ(src->bytes_read(), 64u + 96u + 64u);
}

TEST(Safetensors, ConcurrentReadsCountEveryByte) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  const Tensor w = ramp(DType::BF16, 64, 32);
  write_safetensors(path, {{"w", w}});
  auto src = open_safetensors(path);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 25; ++k) {
        Tensor part = src->read("w", DType::F32, Slice::rows(t * 16, t * 16 + 16));
        if (!bytes_equal(part, w.to(DType::F32).slice_rows(t * 16, t * 16 + 16).contiguous()))
          ++wrong;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(src->bytes_read(), 4u * 25u * 16u * 32u * 2u);
}

// Residency: resident file-backed pages of this process, from /proc/self/status.
int64_t resident_file_kb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  int64_t kb = 0;
  while (std::getline(in, line)) {
    if (line.rfind("RssFile:", 0) == 0 || line.rfind("RssShmem:", 0) == 0)
      kb += std::stoll(line.substr(line.find(':') + 1));
  }
  return kb;
}

TEST(Safetensors, ReadPagesLeaveTheResidentSet) {
  TempDir dir;
  const std::string path = dir / "big.safetensors";
  // 16 MiB of f32 read whole: without releasing, every mapped page would stay resident.
  Tensor big = Tensor::zeros(DType::F32, {1024, 4096});
  write_safetensors(path, {{"big", big}});
  auto src = open_safetensors(path);
  const int64_t before = resident_file_kb();
  Tensor got = src->read("big", DType::F32);
  const int64_t grew = resident_file_kb() - before;
  EXPECT_LT(grew, 4 * 1024) << "resident file pages grew by " << grew << " KiB";
  EXPECT_EQ(got.numel(), 1024 * 4096);
}

TEST(Safetensors, UnalignedDataConvertsCorrectly) {
  TempDir dir;
  const std::string path = dir / "odd.safetensors";
  // A 1-byte tensor first, then a bf16 and an f32 tensor at odd offsets; header length odd too.
  Tensor bf = ramp(DType::BF16, 3, 3);
  Tensor f = ramp(DType::F32, 2, 3);
  std::string data(1, '\x07');
  data.append(static_cast<const char*>(bf.raw()), bf.nbytes());
  data.append(static_cast<const char*>(f.raw()), f.nbytes());
  const std::string header = R"({"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                             R"("b":{"dtype":"BF16","shape":[3,3],"data_offsets":[1,19]},)"
                             R"("f":{"dtype":"F32","shape":[2,3],"data_offsets":[19,43]}} )";
  write_raw(path, header, data);
  auto src = open_safetensors(path);
  EXPECT_TRUE(bytes_equal(src->read("b", DType::F32), bf.to(DType::F32)));
  EXPECT_TRUE(bytes_equal(src->read("f", DType::BF16, Slice::cols(1, 3)),
                          f.to(DType::BF16).slice_cols(1, 3).contiguous()));
  // U8 is a valid safetensors dtype that parallm cannot read: the error names tensor and dtype.
  EXPECT_TRUE(src->has("u"));
  EXPECT_NE(error_of([&] { src->read("u", DType::F32); }).find("tensor \"u\" has dtype U8"),
            std::string::npos);
}

TEST(Safetensors, SliceBoundsAreChecked) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  write_safetensors(path,
                    {{"w", ramp(DType::F32, 4, 6)}, {"n", ramp(DType::F32, 1, 6).reshape({6})}});
  auto src = open_safetensors(path);
  EXPECT_NE(error_of([&] {
              src->read("w", DType::F32, Slice::rows(2, 5));
            }).find("tensor \"w\" [4, 6]: row slice [2, 5) is not within [0, 4]"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              src->read("w", DType::F32, Slice::cols(-1, 2));
            }).find("column slice [-1, 2)"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { src->read("w", DType::F32, Slice::cols(4, 3)); }).find("column slice [4, 3)"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { src->read("n", DType::F32, Slice::cols(0, 1)); }).find("needs a 2-D tensor"),
      std::string::npos);
  EXPECT_NE(error_of([&] { src->read("nope", DType::F32); }).find("no tensor named \"nope\""),
            std::string::npos);
  EXPECT_NE(error_of([&] { src->info("nope"); }).find(path), std::string::npos);
  EXPECT_EQ(src->bytes_read(), 0u);
}

TEST(Safetensors, BadHeadersFailWithTheNumbers) {
  TempDir dir;
  const std::string p = dir / "bad.safetensors";
  const std::string good_entry = R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  const std::string data16(16, '\0');

  std::ofstream(p, std::ios::binary) << "abc";
  EXPECT_NE(open_error(p).find("the file has 3 bytes, too few for the 8-byte header length"),
            std::string::npos);

  write_raw(p, "{" + good_entry + "}", data16, 1000);
  EXPECT_NE(open_error(p).find(
                "header length 1000 runs past the end of the file (81 bytes, so at most 73)"),
            std::string::npos)
      << open_error(p);

  write_raw(p, "{not json", data16);
  EXPECT_NE(open_error(p).find("header is not valid JSON"), std::string::npos);

  write_raw(p, "[1, 2]", data16);
  EXPECT_NE(open_error(p).find("must be a JSON object, got a array"), std::string::npos);

  write_raw(p, R"({"w":{"shape":[2,2],"data_offsets":[0,16]}})", data16);
  EXPECT_NE(open_error(p).find("tensor \"w\" has no \"dtype\""), std::string::npos);

  write_raw(p, R"({"w":{"dtype":"Q4_K","shape":[2,2],"data_offsets":[0,16]}})", data16);
  EXPECT_NE(open_error(p).find("tensor \"w\" has unknown dtype \"Q4_K\""), std::string::npos);

  write_raw(p, R"({"w":{"dtype":"F32","shape":[2,-2],"data_offsets":[0,16]}})", data16);
  EXPECT_NE(open_error(p).find("tensors[\"w\"].shape[1] must be a non-negative integer, got -2"),
            std::string::npos);

  write_raw(p, R"({"w":{"dtype":"F32","shape":[2,2.5],"data_offsets":[0,16]}})", data16);
  EXPECT_NE(open_error(p).find("shape[1] must be a non-negative integer, got 2.5"),
            std::string::npos);

  write_raw(p, R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0]}})", data16);
  EXPECT_NE(open_error(p).find("needs \"data_offsets\": [begin, end], got an array of 1"),
            std::string::npos);

  write_raw(p, R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", data16);
  EXPECT_NE(open_error(p).find("tensor \"w\" begins at byte 8 after it ends at byte 4"),
            std::string::npos);

  write_raw(p, R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", data16);
  EXPECT_NE(open_error(p).find("tensor \"w\" ends at byte 24 but the file has 16 bytes of data"),
            std::string::npos)
      << open_error(p);

  write_raw(p, R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", data16);
  EXPECT_NE(open_error(p).find("data_offsets [0, 16] (16 bytes) but BF16 [2, 2] needs 8 bytes"),
            std::string::npos)
      << open_error(p);

  write_raw(p,
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("b":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}})",
            data16);
  EXPECT_NE(open_error(p).find("tensors \"a\" (bytes [0, 8)) and \"b\" (bytes [4, 16)) overlap"),
            std::string::npos)
      << open_error(p);

  write_raw(p, "{" + good_entry + R"(,"__metadata__":{"format":1}})", data16);
  EXPECT_NE(open_error(p).find("__metadata__[\"format\"] must be a string, got 1"),
            std::string::npos);

  write_raw(p, R"({"w":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,16]}})",
            data16);
  EXPECT_NE(open_error(p).find("is too large"), std::string::npos);

  // A good file opens; its error message path is the file.
  write_raw(p, "{" + good_entry + "}", data16);
  EXPECT_EQ(open_safetensors(p)->names(), std::vector<std::string>{"w"});
  EXPECT_NE(open_error(p + ".missing").find("no such file or directory"), std::string::npos);
}

TEST(Safetensors, TruncatedFileNamesTheTensorAndSizes) {
  TempDir dir;
  const std::string p = dir / "m.safetensors";
  write_safetensors(p, {{"model.layers.0.mlp.up_proj.weight", ramp(DType::F32, 4, 4)},
                        {"model.layers.3.mlp.up_proj.weight", ramp(DType::F32, 4, 4)}});
  const uint64_t size = fs::file_size(p);
  fs::resize_file(p, size - 20);
  const std::string err = open_error(p);
  EXPECT_NE(err.find("[safetensors] " + p +
                     ": tensor \"model.layers.3.mlp.up_proj.weight\" ends "
                     "at byte 128 but the file has 108 bytes of data"),
            std::string::npos)
      << err;
  // Cut into the header itself: the length field now points past the end.
  fs::resize_file(p, 40);
  EXPECT_NE(open_error(p).find("runs past the end of the file (40 bytes"), std::string::npos);
}

TEST(Safetensors, WriteRejectsBadInputAndLeavesNoFile) {
  TempDir dir;
  const std::string p = dir / "w.safetensors";
  EXPECT_NE(error_of([&] {
              write_safetensors(p, {{"a", ramp(DType::F32, 1, 1)}, {"a", ramp(DType::F32, 1, 1)}});
            }).find("tensor \"a\" is given twice"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              write_safetensors(p, {{"__metadata__", ramp(DType::F32, 1, 1)}});
            }).find("cannot write a tensor named \"__metadata__\""),
            std::string::npos);
  EXPECT_THROW(
      write_safetensors(dir / "no/such/dir/w.safetensors", {{"a", ramp(DType::F32, 1, 1)}}),
      std::runtime_error);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 0);
  // A strided view is written as its contiguous copy.
  Tensor w = ramp(DType::F32, 3, 4);
  write_safetensors(p, {{"cols", w.slice_cols(1, 3)}});
  EXPECT_TRUE(
      bytes_equal(open_safetensors(p)->read("cols", DType::F32), w.slice_cols(1, 3).contiguous()));
}

// Two shards and an index, as Hugging Face writes them.
struct ShardedModel {
  TempDir dir;
  Tensor a = ramp(DType::BF16, 6, 4), b = ramp(DType::F32, 3, 3), c = ramp(DType::F16, 2, 5);
  ShardedModel() {
    write_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", a}, {"b", b}});
    write_safetensors(dir / "model-00002-of-00002.safetensors", {{"c", c}});
    write_index(
        R"({"metadata":{"total_size":98},"weight_map":{"a":"model-00001-of-00002.safetensors",)"
        R"("c":"model-00002-of-00002.safetensors","b":"model-00001-of-00002.safetensors"}})");
  }
  void write_index(const std::string& text) {
    std::ofstream(dir / "model.safetensors.index.json") << text;
  }
};

TEST(Safetensors, ShardedIndexReadsFromEachShard) {
  ShardedModel m;
  for (const std::string& path : {m.dir.path(), m.dir / "model.safetensors.index.json"}) {
    auto src = open_safetensors(path);
    auto names = src->names();
    std::sort(names.begin(), names.end());
    EXPECT_EQ(names, (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_EQ(src->describe(), path);
    EXPECT_TRUE(bytes_equal(src->read("a", DType::BF16, Slice::rows(1, 3)),
                            m.a.slice_rows(1, 3).contiguous()));
    EXPECT_TRUE(bytes_equal(src->read("c", DType::F32, Slice::cols(1, 4)),
                            m.c.to(DType::F32).slice_cols(1, 4).contiguous()));
    EXPECT_TRUE(bytes_equal(src->read("b", DType::F32), m.b));
    EXPECT_EQ(src->bytes_read(), 2u * 4u * 2u + 2u * 3u * 2u + 9u * 4u);
  }
}

TEST(Safetensors, ShardedIndexErrorsNameTheShardAndTensor) {
  ShardedModel m;
  fs::remove(m.dir / "model-00002-of-00002.safetensors");
  std::string err = open_error(m.dir.path());
  EXPECT_NE(err.find("shard \"model-00002-of-00002.safetensors\" (holding tensor \"c\") does not "
                     "exist"),
            std::string::npos)
      << err;

  ShardedModel m2;
  m2.write_index(R"({"weight_map":{"a":"model-00002-of-00002.safetensors"}})");
  err = open_error(m2.dir.path());
  EXPECT_NE(err.find("the index puts tensor \"a\" in " +
                     (m2.dir / "model-00002-of-00002.safetensors") + ", which has no such tensor"),
            std::string::npos)
      << err;

  m2.write_index(R"({"weight_map":{"a":7}})");
  EXPECT_NE(open_error(m2.dir.path()).find("weight_map[\"a\"] must be a file name, got 7"),
            std::string::npos);
  m2.write_index(R"({"metadata":{}})");
  EXPECT_NE(open_error(m2.dir.path()).find("missing the \"weight_map\" object"), std::string::npos);
  m2.write_index(R"({"weight_map":)");
  EXPECT_NE(open_error(m2.dir.path()).find("invalid JSON"), std::string::npos);

  // The same tensor in two shards is ambiguous.
  ShardedModel m3;
  write_safetensors(m3.dir / "model-00002-of-00002.safetensors", {{"c", m3.c}, {"b", m3.b}});
  EXPECT_NE(open_error(m3.dir.path()).find("tensor \"b\" is in more than one shard"),
            std::string::npos);

  TempDir empty;
  EXPECT_NE(open_error(empty.path())
                .find("holds neither model.safetensors nor model.safetensors.index.json"),
            std::string::npos);
}

TEST(MappedFile, MapsMovesAndRejectsDirectories) {
  TempDir dir;
  std::ofstream(dir / "f", std::ios::binary) << "hello";
  MappedFile a(dir / "f");
  ASSERT_EQ(a.size(), 5u);
  EXPECT_EQ(std::memcmp(a.data(), "hello", 5), 0);
  MappedFile b(std::move(a));
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(std::memcmp(b.data(), "hello", 5), 0);
  b.release(0, 5);  // dropping pages never loses data
  EXPECT_EQ(std::memcmp(b.data(), "hello", 5), 0);
  std::ofstream(dir / "empty", std::ios::binary);
  EXPECT_EQ(MappedFile(dir / "empty").size(), 0u);
  EXPECT_THROW(MappedFile(dir.path()), std::invalid_argument);
  EXPECT_THROW(MappedFile(dir / "missing"), std::invalid_argument);
  EXPECT_NE(open_error(dir / "empty").find("the file has 0 bytes"), std::string::npos);
}

}  // namespace
}  // namespace parallm
