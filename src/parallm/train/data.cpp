#include "parallm/train/data.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <fstream>
#include <string_view>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/core/thread_pool.h"
#include "parallm/model/tokenizer.h"

namespace parallm::train {
namespace {

constexpr const char* kComponent = "data";

// Every id below vocab; names the file, the id and its index otherwise.
void check_ids(const std::vector<int32_t>& ids, int64_t vocab, const std::string& path) {
  if (vocab <= 0) fail(kComponent, path, ": vocabulary size ", vocab, " must be positive");
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      fail(kComponent, path, ": token id ", ids[i], " at index ", i,
           " is outside the model's vocabulary [0, ", vocab, ")");
    }
  }
}

// splitmix64's output function: a bijective 64-bit mixer (all arithmetic mod 2^64).
uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr int kFeistelRounds = 6;

}  // namespace

TokenFileType parse_token_file_type(const std::string& name, const std::string& flag) {
  if (name == "u16") return TokenFileType::U16;
  if (name == "u32") return TokenFileType::U32;
  fail(kComponent, flag, " \"", name, "\" is neither u16 nor u32");
}

int token_bytes(TokenFileType type) {
  return type == TokenFileType::U16 ? 2 : 4;
}

TokenData TokenData::from_bin(const std::string& path, TokenFileType type, int64_t vocab) {
  if (vocab <= 0) fail(kComponent, path, ": vocabulary size ", vocab, " must be positive");
  uint64_t size = 0;
  const int fd = open_regular_file(path, kComponent, &size);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  const int width = token_bytes(type);
  const char* type_name = type == TokenFileType::U16 ? "u16" : "u32";
  if (size > kMaxTokenFileBytes) {
    fail(kComponent, path, ": ", size, " bytes, larger than the ", kMaxTokenFileBytes,
         " bytes allowed for a token file");
  }
  if (size % static_cast<uint64_t>(width) != 0) {
    fail(kComponent, path, ": size ", size, " bytes is not a multiple of ", width, " (", type_name,
         " ids); is --data-dtype right?");
  }
  // Read exactly the size fstat saw; a file that changes while it is read is refused.
  std::vector<unsigned char> bytes(static_cast<size_t>(size));
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail<std::runtime_error>(kComponent, path, ": read failed (", std::strerror(errno), ")");
    }
    if (n == 0) {
      fail<std::runtime_error>(kComponent, path, ": ended after ", got, " of ", size,
                               " bytes (changed while read?)");
    }
    got += static_cast<size_t>(n);
  }
  TokenData d;
  d.path_ = path;
  const size_t n = bytes.size() / static_cast<size_t>(width);
  d.ids_.resize(n);
  // Little-endian by definition of the format, whatever the host's byte order.
  for (size_t i = 0; i < n; ++i) {
    const unsigned char* b = bytes.data() + i * static_cast<size_t>(width);
    uint32_t id = uint32_t{b[0]} | uint32_t{b[1]} << 8;
    if (width == 4) id |= uint32_t{b[2]} << 16 | uint32_t{b[3]} << 24;
    // Checked here, before the narrowing to int32, so a huge u32 is named as it was written.
    if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(vocab)) {
      fail(kComponent, path, ": token id ", id, " at index ", i,
           " is outside the model's vocabulary [0, ", vocab, ")");
    }
    d.ids_[i] = static_cast<int32_t>(id);
  }
  return d;
}

TokenData TokenData::from_text(const std::string& path, const Tokenizer& tok, int64_t vocab) {
  if (vocab <= 0) fail(kComponent, path, ": vocabulary size ", vocab, " must be positive");
  // read_text_file reports a missing file as the environment's fault; here the path is the
  // user's --data, so say "no such file" as a caller mistake first.
  uint64_t size = 0;
  ::close(open_regular_file(path, kComponent, &size));
  const std::string text = read_text_file(path, kMaxTextFileBytes, kComponent);
  // Lines, each with its '\n' (the last one may lack it), grouped into blocks of about
  // kBlockBytes for the threads. Encoding line by line keeps the cost linear (sentencepiece's
  // BPE is superlinear on one 4 MB string) and defines the result simply.
  constexpr size_t kBlockBytes = size_t{1} << 16;
  std::vector<size_t> line_starts;
  for (size_t pos = 0; pos < text.size();) {
    line_starts.push_back(pos);
    const size_t nl = text.find('\n', pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
  }
  line_starts.push_back(text.size());
  std::vector<size_t> block_starts;  // indices into line_starts
  for (size_t l = 0; l + 1 < line_starts.size();) {
    block_starts.push_back(l);
    const size_t begin = line_starts[l];
    while (l + 1 < line_starts.size() && line_starts[l] - begin < kBlockBytes) ++l;
  }
  block_starts.push_back(line_starts.size() - 1);
  const int64_t blocks = static_cast<int64_t>(block_starts.size()) - 1;
  std::vector<std::vector<int32_t>> parts(static_cast<size_t>(std::max<int64_t>(blocks, 0)));
  std::vector<std::exception_ptr> errors(parts.size());
  auto encode_blocks = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      try {
        auto& out = parts[static_cast<size_t>(b)];
        for (size_t l = block_starts[static_cast<size_t>(b)];
             l < block_starts[static_cast<size_t>(b) + 1]; ++l) {
          const std::string_view line(text.data() + line_starts[l],
                                      line_starts[l + 1] - line_starts[l]);
          const auto ids = tok.encode(line, /*add_bos=*/false);
          out.insert(out.end(), ids.begin(), ids.end());
        }
      } catch (...) {
        errors[static_cast<size_t>(b)] = std::current_exception();
      }
    }
  };
  if (blocks > 1) {
    ThreadPool::current().parallel_for_dynamic(blocks, 1, encode_blocks);
  } else {
    encode_blocks(0, blocks);
  }
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  TokenData d;
  d.path_ = path;
  size_t total = tok.bos_id() >= 0 ? 1 : 0;
  for (const auto& p : parts) total += p.size();
  d.ids_.reserve(total);
  if (tok.bos_id() >= 0) d.ids_.push_back(tok.bos_id());
  for (const auto& p : parts) d.ids_.insert(d.ids_.end(), p.begin(), p.end());
  check_ids(d.ids_, vocab, path);
  return d;
}

TokenData TokenData::from_ids(std::vector<int32_t> ids, int64_t vocab) {
  TokenData d;
  d.path_ = "<ids>";
  check_ids(ids, vocab, d.path_);
  d.ids_ = std::move(ids);
  return d;
}

TokenData TokenData::from_file(const std::string& path, TokenFileType type, const Tokenizer* tok,
                               int64_t vocab) {
  if (path.size() >= 4 && path.compare(path.size() - 4, 4, ".bin") == 0)
    return from_bin(path, type, vocab);
  if (!tok) {
    fail(kComponent, path,
         ": a text file (not *.bin) needs the model's tokenizer and the model "
         "has none; write a token file with parallm tokenize --tokenizer FILE");
  }
  return from_text(path, *tok, vocab);
}

int64_t TokenData::sequences(int64_t S) const {
  if (S < 1) fail(kComponent, "--seq-len ", S, " must be at least 1");
  const int64_t n = size();
  const int64_t count = n > 0 ? (n - 1) / S : 0;
  if (count == 0) {
    fail(kComponent, path_, ": ", n, " tokens are fewer than one sequence of --seq-len ", S,
         " (inputs and targets need ", S + 1, ")");
  }
  return count;
}

void write_token_file(const std::string& path, const std::vector<int32_t>& ids,
                      TokenFileType type) {
  const int width = token_bytes(type);
  const int64_t limit = type == TokenFileType::U16 ? int64_t{1} << 16 : int64_t{1} << 32;
  std::vector<unsigned char> bytes(ids.size() * static_cast<size_t>(width));
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= limit) {
      fail(kComponent, path, ": token id ", id, " at index ", i, " does not fit --data-dtype ",
           type == TokenFileType::U16 ? "u16" : "u32");
    }
    unsigned char* b = bytes.data() + i * static_cast<size_t>(width);
    const auto u = static_cast<uint32_t>(id);
    for (int k = 0; k < width; ++k) b[k] = static_cast<unsigned char>(u >> (8 * k));
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail<std::runtime_error>(kComponent, path, ": cannot open for writing");
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) fail<std::runtime_error>(kComponent, path, ": write failed (disk full?)");
}

void BatchOrder::check() const {
  if (seq_len < 1) fail(kComponent, "--seq-len ", seq_len, " must be at least 1");
  if (global_batch < 1)
    fail(kComponent, "--global-batch-size ", global_batch, " must be at least 1");
  if (micro_batch < 1) fail(kComponent, "--micro-batch-size ", micro_batch, " must be at least 1");
  if (dp < 1) fail(kComponent, "--dp ", dp, " must be at least 1");
  if (global_batch % (micro_batch * dp) != 0) {
    fail(kComponent, "--global-batch-size ", global_batch,
         " is not a multiple of --micro-batch-size ", micro_batch, " x --dp ", dp,
         " (= ", micro_batch * dp, ")");
  }
}

int64_t shuffle_index(uint64_t seed, uint64_t pass, int64_t index, int64_t count) {
  if (count < 1 || index < 0 || index >= count) {
    fail(kComponent, "shuffle index ", index, " outside [0, ", count, ")");
  }
  // Half width h: the smallest h >= 1 with 2^(2h) >= count; the network permutes [0, 2^(2h)).
  int half = 1;
  while (half < 32 && (uint64_t{1} << (2 * half)) < static_cast<uint64_t>(count)) ++half;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  uint64_t keys[kFeistelRounds];
  for (int r = 0; r < kFeistelRounds; ++r) {
    keys[r] = mix64(seed ^ mix64(pass ^ mix64(static_cast<uint64_t>(r))));
  }
  auto encrypt = [&](uint64_t x) {
    uint64_t left = x >> half, right = x & mask;
    for (int r = 0; r < kFeistelRounds; ++r) {
      const uint64_t next = left ^ (mix64(right ^ keys[r]) & mask);
      left = right;
      right = next;
    }
    return (left << half) | right;
  };
  // Cycle walking: apply the permutation until the value lands in [0, count). The domain is less
  // than 4 * count, so this takes under 4 rounds on average, and it is a bijection of [0, count).
  uint64_t y = encrypt(static_cast<uint64_t>(index));
  while (y >= static_cast<uint64_t>(count)) y = encrypt(y);
  return static_cast<int64_t>(y);
}

int64_t BatchOrder::sequence(int64_t step, int dp_rank, int64_t micro, int64_t i,
                             int64_t count) const {
  if (step < 0 || dp_rank < 0 || dp_rank >= dp || micro < 0 || micro >= micro_batches() || i < 0 ||
      i >= micro_batch || count < 1) {
    fail(kComponent, "batch position out of range: step ", step, ", dp rank ", dp_rank, "/", dp,
         ", micro-batch ", micro, "/", micro_batches(), ", sequence ", i, "/", micro_batch, ", of ",
         count, " sequences");
  }
  const int64_t j = step * global_batch + dp_rank * (global_batch / dp) + micro * micro_batch + i;
  const int64_t index = j % count;
  if (!shuffle) return index;
  return shuffle_index(seed, static_cast<uint64_t>(j / count), index, count);
}

void fill_micro_batch(const TokenData& data, const BatchOrder& order, int64_t step, int dp_rank,
                      int64_t micro, int32_t* inputs, int32_t* targets) {
  const int64_t S = order.seq_len;
  const int64_t count = data.sequences(S);
  const int32_t* ids = data.ids().data();
  for (int64_t i = 0; i < order.micro_batch; ++i) {
    const int64_t j = order.sequence(step, dp_rank, micro, i, count);
    const int32_t* src = ids + j * S;
    std::memcpy(inputs + i * S, src, static_cast<size_t>(S) * sizeof(int32_t));
    std::memcpy(targets + i * S, src + 1, static_cast<size_t>(S) * sizeof(int32_t));
  }
}

}  // namespace parallm::train
