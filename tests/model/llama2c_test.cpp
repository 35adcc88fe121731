#include "parallm/model/llama2c.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "parallm/model/weights.h"
#include "test_util.h"

namespace parallm {
namespace {

namespace fs = std::filesystem;

const std::string kStories = testing::stories_model();

using testing::TempDir;

using testing::error_of;

// `n` float32 values at float index `at` after the 28-byte header, read with plain file I/O.
std::vector<float> raw_floats(const std::string& path, int64_t at, int64_t n) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(28 + at * 4);
  std::vector<float> v(static_cast<size_t>(n));
  in.read(reinterpret_cast<char*>(v.data()), n * 4);
  EXPECT_TRUE(in.good());
  return v;
}

std::vector<float> to_vec(const Tensor& t) {
  Tensor f = t.to(DType::F32);
  return std::vector<float>(f.data<float>(), f.data<float>() + f.numel());
}

TEST(Llama2c, Stories260KIsTheFileTheReadmeDescribes) {
  FILE* p = ::popen(("sha256sum " + kStories).c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[65] = {};
  const size_t n = std::fread(buf, 1, 64, p);
  ::pclose(p);
  if (n != 64) GTEST_SKIP() << "sha256sum is not available";
  EXPECT_EQ(std::string(buf), "9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6");
}

TEST(Llama2c, Stories260KLoadsWithItsConfigAndValues) {
  ModelConfig c;
  auto src = open_llama2c(kStories, &c);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.rope_interleaved);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_NO_THROW(check_llama_weights(*src, c));
  EXPECT_EQ(src->names().size(), 1u + 9u * 5u + 1u);  // no lm_head: tied
  EXPECT_FALSE(src->has(names::kLmHead));

  // Spot values against the file read raw, at offsets computed from the README's layout.
  const int64_t dim = 64, kv = 32, hid = 172, L = 5, vocab = 512;
  EXPECT_EQ(to_vec(src->read(names::kEmbed, DType::F32, Slice::rows(0, 1))),
            raw_floats(kStories, 0, dim));
  EXPECT_EQ(to_vec(src->read(names::kEmbed, DType::F32, Slice::rows(511, 512))),
            raw_floats(kStories, 511 * dim, dim));
  int64_t at = vocab * dim;
  EXPECT_EQ(to_vec(src->read(names::layer(2, "input_layernorm.weight"), DType::F32)),
            raw_floats(kStories, at + 2 * dim, dim));
  at += L * dim + L * dim * dim;  // rms_att, wq
  Tensor wk3 = src->read(names::layer(3, "self_attn.k_proj.weight"), DType::F32);
  EXPECT_EQ(wk3.shape(), (Shape{kv, dim}));
  EXPECT_EQ(to_vec(wk3), raw_floats(kStories, at + 3 * kv * dim, kv * dim));
  at += 2 * L * kv * dim + L * dim * dim + L * dim;  // wk, wv, wo, rms_ffn
  at += L * hid * dim;                               // w1
  Tensor down4 = src->read(names::layer(4, "mlp.down_proj.weight"), DType::F32);  // w2
  EXPECT_EQ(down4.shape(), (Shape{dim, hid}));
  EXPECT_EQ(to_vec(down4), raw_floats(kStories, at + 4 * dim * hid, dim * hid));
  at += 2 * L * dim * hid;  // w2, w3
  EXPECT_EQ(to_vec(src->read(names::kNorm, DType::F32)), raw_floats(kStories, at, dim));
  // A trained norm weight is not all ones and not all zeros.
  auto norm = to_vec(src->read(names::kNorm, DType::F32));
  EXPECT_NE(norm[0], 0.0f);
  EXPECT_NE(norm[0], 1.0f);

  // open_model recognises the .bin and gives the same config.
  ModelConfig c2;
  auto src2 = open_model(kStories, &c2);
  EXPECT_EQ(c2.to_json(), c.to_json());
  EXPECT_EQ(
      to_vec(
          src2->read(names::layer(0, "self_attn.q_proj.weight"), DType::BF16, Slice::cols(8, 16))),
      to_vec(src->read(names::layer(0, "self_attn.q_proj.weight"), DType::F32, Slice::cols(8, 16))
                 .to(DType::BF16)));
}

// Writes a llama2.c file whose float number k (after the header) holds the value k, so that every
// tensor's first value is its offset in floats.
void write_numbered(const std::string& path, Llama2cHeader h) {
  std::ofstream out(path, std::ios::binary);
  const int32_t head[7] = {h.dim,        h.hidden_dim, h.n_layers, h.n_heads,
                           h.n_kv_heads, h.vocab_size, h.seq_len};
  out.write(reinterpret_cast<const char*>(head), sizeof(head));
  const uint64_t floats = (llama2c_file_bytes(h) - 28) / 4;
  for (uint64_t k = 0; k < floats; ++k) {
    const float v = static_cast<float>(k);
    out.write(reinterpret_cast<const char*>(&v), 4);
  }
}

TEST(Llama2c, UntiedCheckpointMapsEveryArrayToItsName) {
  TempDir dir;
  const std::string path = dir / "untied.bin";
  // dim 8, hidden 6, 2 layers, 4 heads of 2, 2 KV heads (kv_dim 4), vocab -5 (untied), seq 3.
  Llama2cHeader h{8, 6, 2, 4, 2, -5, 3};
  write_numbered(path, h);
  ModelConfig c;
  auto src = open_llama2c(path, &c);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.vocab_size, 5);
  EXPECT_EQ(c.kv_dim(), 4);
  EXPECT_NO_THROW(check_llama_weights(*src, c));
  const int64_t d = 8, f = 6, kv = 4, v = 5, L = 2;
  auto first = [&](const std::string& name) {
    return src->read(name, DType::F32).data<float>()[0];
  };
  int64_t at = 0;
  EXPECT_EQ(first(names::kEmbed), at);
  at += v * d;
  EXPECT_EQ(first(names::layer(1, "input_layernorm.weight")), at + d);
  at += L * d;
  EXPECT_EQ(first(names::layer(1, "self_attn.q_proj.weight")), at + d * d);
  at += L * d * d;
  EXPECT_EQ(first(names::layer(0, "self_attn.k_proj.weight")), at);
  at += L * kv * d;
  EXPECT_EQ(first(names::layer(1, "self_attn.v_proj.weight")), at + kv * d);
  at += L * kv * d;
  EXPECT_EQ(first(names::layer(1, "self_attn.o_proj.weight")), at + d * d);
  at += L * d * d;
  EXPECT_EQ(first(names::layer(1, "post_attention_layernorm.weight")), at + d);
  at += L * d;
  EXPECT_EQ(first(names::layer(1, "mlp.gate_proj.weight")), at + f * d);  // w1
  at += L * f * d;
  EXPECT_EQ(first(names::layer(1, "mlp.down_proj.weight")), at + d * f);  // w2
  at += L * d * f;
  EXPECT_EQ(first(names::layer(0, "mlp.up_proj.weight")), at);  // w3
  at += L * f * d;
  EXPECT_EQ(first(names::kNorm), at);
  at += d + 3 * 2;  // rms_final, RoPE tables (seq_len x head_dim)
  Tensor head = src->read(names::kLmHead, DType::F32);
  EXPECT_EQ(head.shape(), (Shape{v, d}));
  EXPECT_EQ(head.data<float>()[0], at);
  EXPECT_EQ(head.data<float>()[v * d - 1], at + v * d - 1);  // the very last float of the file
  // A row slice of lm_head reads only its rows.
  const uint64_t before = src->bytes_read();
  EXPECT_EQ(src->read(names::kLmHead, DType::F32, Slice::rows(2, 3)).data<float>()[0], at + 2 * d);
  EXPECT_EQ(src->bytes_read() - before, static_cast<uint64_t>(d * 4));
}

TEST(Llama2c, TruncatedAndBadHeadersAreNamed) {
  TempDir dir;
  const std::string cut = dir / "cut.bin";
  fs::copy_file(kStories, cut);
  fs::resize_file(cut, fs::file_size(kStories) - 100);
  std::string err = error_of([&] { open_llama2c(cut, nullptr); });
  EXPECT_NE(err.find("[llama2c] " + cut +
                     ": the file has 1056440 bytes but its header (dim 64, "
                     "hidden_dim 172, n_layers 5, n_heads 8, n_kv_heads 4, vocab_size 512, "
                     "seq_len 512) implies 1056540 (truncated?)"),
            std::string::npos)
      << err;
  // The same through open_model, which picks the reader from the .bin suffix.
  EXPECT_NE(error_of([&] { open_model(cut, nullptr); }).find("implies 1056540"), std::string::npos);

  const std::string tiny = dir / "tiny.bin";
  std::ofstream(tiny, std::ios::binary) << "abcd";
  EXPECT_NE(error_of([&] {
              open_llama2c(tiny, nullptr);
            }).find("the file has 4 bytes, fewer than the 28-byte header"),
            std::string::npos);

  auto write_header = [&](std::vector<int32_t> head) {
    std::ofstream out(tiny, std::ios::binary);
    out.write(reinterpret_cast<const char*>(head.data()),
              static_cast<std::streamsize>(head.size() * 4));
    out << std::string(64, '\0');
  };
  write_header({64, 172, 0, 8, 4, 512, 512});
  EXPECT_NE(error_of([&] {
              open_llama2c(tiny, nullptr);
            }).find("header field n_layers must be positive, got 0"),
            std::string::npos);
  write_header({64, 172, 5, 6, 3, 512, 512});
  EXPECT_NE(
      error_of([&] { open_llama2c(tiny, nullptr); }).find("dim 64 is not divisible by n_heads 6"),
      std::string::npos);
  write_header({64, 172, 5, 8, 3, 512, 512});
  EXPECT_NE(error_of([&] {
              open_llama2c(tiny, nullptr);
            }).find("n_heads 8 is not divisible by n_kv_heads 3"),
            std::string::npos);
  write_header({64, 172, 5, 8, 4, 0, 512});
  EXPECT_NE(error_of([&] { open_llama2c(tiny, nullptr); }).find("vocab_size must be non-zero"),
            std::string::npos);
  write_header({0x616b3432, 2, 64, 172, 5, 8, 4});
  EXPECT_NE(error_of([&] { open_llama2c(tiny, nullptr); }).find("version-2 export"),
            std::string::npos);
  // Huge fields do not overflow the size computation: the config's checked parameter count
  // refuses them, naming the sizes.
  write_header({1 << 30, 1 << 30, 1 << 30, 1, 1, -(1 << 30), 1 << 30});
  EXPECT_NE(error_of([&] { open_llama2c(tiny, nullptr); }).find("overflows 64 bits"),
            std::string::npos);
  // Large but not overflowing: the size check catches them.
  write_header({1 << 16, 1 << 16, 1 << 10, 1, 1, -(1 << 16), 1 << 10});
  EXPECT_NE(error_of([&] { open_llama2c(tiny, nullptr); }).find("bytes but its header"),
            std::string::npos);
  EXPECT_NE(error_of([&] { open_llama2c(dir / "absent.bin", nullptr); }).find("no such file"),
            std::string::npos);
}

}  // namespace
}  // namespace parallm
