// Training data: a flat array of token ids, and the fixed order in which a run reads it, so that
// any other implementation can reproduce a run (docs/training.md):
//
//   with sequence length S, sequence j is inputs tokens[j*S .. j*S+S-1] and targets
//   tokens[j*S+1 .. j*S+S]; there are floor((n-1)/S) sequences, used cyclically; step k's global
//   batch is sequences k*G .. k*G+G-1 (G = global batch, in sequences); data-parallel rank d takes
//   the d-th block of G/DP consecutive sequences, cut into micro-batches of M consecutive
//   sequences. With shuffle, position j of the stream is sequence perm_q[j mod count], q =
//   floor(j / count) the pass, perm_q a permutation of the sequences keyed by the seed and the
//   pass (shuffle_index below; exactly specified in docs/training.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace parallm {
class Tokenizer;
}

namespace parallm::train {

enum class TokenFileType { U16, U32 };

// "u16" / "u32" (the --data-dtype flag's values); throws std::invalid_argument naming `flag`.
TokenFileType parse_token_file_type(const std::string& name, const std::string& flag);
// Bytes per id: 2 or 4.
int token_bytes(TokenFileType type);

// Input limits (regular files only, read through core/json_limits.h's bounded helpers): a token
// file up to 4 GiB (2^31 u16 ids, 8 GiB as int32 in memory), a text file up to 1 GiB.
constexpr uint64_t kMaxTokenFileBytes = uint64_t{1} << 32;
constexpr uint64_t kMaxTextFileBytes = uint64_t{1} << 30;

// Writes ids as a raw little-endian array of `type` (what `parallm tokenize` writes). Throws
// std::invalid_argument naming the id and its index when one does not fit the type (u16: >= 65536)
// and std::runtime_error naming the file when it cannot be written.
void write_token_file(const std::string& path, const std::vector<int32_t>& ids, TokenFileType type);

class TokenData {
 public:
  TokenData() = default;
  // A raw little-endian array of uint16 (or uint32) ids. Throws std::invalid_argument naming the
  // file (and the id and its index) when it is missing or not a regular file, is larger than
  // kMaxTokenFileBytes, its size is not a whole number of ids, or an id is >= vocab;
  // std::runtime_error when it exists but cannot be opened or read.
  static TokenData from_bin(const std::string& path, TokenFileType type, int64_t vocab);
  // A text file tokenized with `tok`: BOS (when the tokenizer has one) at the start of the file,
  // no EOS, then the concatenation of tok.encode(line, no BOS) for each line of the file, each
  // line with its '\n' (the last may lack it); lines are encoded on ThreadPool::current(). Same
  // file errors as from_bin (limit kMaxTextFileBytes); an id >= vocab (a tokenizer larger than the
  // model's vocabulary) is named with its index.
  static TokenData from_text(const std::string& path, const Tokenizer& tok, int64_t vocab);
  static TokenData from_ids(std::vector<int32_t> ids, int64_t vocab);
  // What --data FILE means: a name ending in ".bin" is a token file of `type` (from_bin), anything
  // else is text (from_text with `tok`; std::invalid_argument naming the file when tok is null).
  static TokenData from_file(const std::string& path, TokenFileType type, const Tokenizer* tok,
                             int64_t vocab);

  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  const std::vector<int32_t>& ids() const { return ids_; }
  // floor((n-1)/S); throws std::invalid_argument naming the file (or "<ids>"), its token count and
  // --seq-len when it is 0, or when S < 1.
  int64_t sequences(int64_t S) const;

 private:
  std::vector<int32_t> ids_;
  std::string path_;
};

struct BatchOrder {
  int64_t seq_len = 0;       // S
  int64_t global_batch = 0;  // G, sequences per step
  int64_t micro_batch = 0;   // M, sequences per micro-batch
  int dp = 1;                // data-parallel ranks
  bool shuffle = false;
  uint64_t seed = 0;
  // Throws std::invalid_argument naming the flags when G is not a multiple of M * dp, or a value is
  // not positive (--seq-len, --global-batch-size, --micro-batch-size, --dp).
  void check() const;
  int64_t micro_batches() const { return global_batch / (micro_batch * dp); }
  // The sequence index (in [0, count)) of the i-th sequence of micro-batch `micro` of DP rank
  // `dp_rank` at step `step`: position j = step*G + dp_rank*(G/dp) + micro*M + i of the stream,
  // j mod count without shuffle, shuffle_index(j / count, j mod count, count) with it. Throws
  // std::invalid_argument when an index is out of range.
  int64_t sequence(int64_t step, int dp_rank, int64_t micro, int64_t i, int64_t count) const;
};

// The shuffled order of pass `pass`: a bijection of [0, count) keyed by (seed, pass) -- a 6-round
// balanced Feistel network on the smallest even number of bits covering count, with cycle walking
// (docs/training.md spells it out so another implementation can reproduce it). Stateless, so any
// rank computes any position in O(1) expected time without holding a permutation.
int64_t shuffle_index(uint64_t seed, uint64_t pass, int64_t index, int64_t count);

// Fills inputs and targets [M * S] for that micro-batch.
void fill_micro_batch(const TokenData& data, const BatchOrder& order, int64_t step, int dp_rank,
                      int64_t micro, int32_t* inputs, int32_t* targets);

}  // namespace parallm::train
