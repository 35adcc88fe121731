// Training data: a flat array of token ids, and the fixed order in which a run reads it, so that
// any other implementation can reproduce a run (docs/training.md):
//
//   with sequence length S, sequence j is inputs tokens[j*S .. j*S+S-1] and targets
//   tokens[j*S+1 .. j*S+S]; there are floor((n-1)/S) sequences, used cyclically; step k's global
//   batch is sequences k*G .. k*G+G-1 (G = global batch, in sequences); data-parallel rank d takes
//   the d-th block of G/DP consecutive sequences, cut into micro-batches of M consecutive
//   sequences. With shuffle, sequence j of the order is perm[j mod count], perm a permutation of
//   the sequences drawn from the seed, redrawn every pass (documented in docs/training.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace parallm {
class Tokenizer;
}

namespace parallm::train {

enum class TokenFileType { U16, U32 };

class TokenData {
 public:
  TokenData() = default;
  // A raw little-endian array of uint16 (or uint32) ids. Throws std::invalid_argument naming the
  // file (and the id and its index) when it cannot be read, its size is not a whole number of ids,
  // or an id is >= vocab.
  static TokenData from_bin(const std::string& path, TokenFileType type, int64_t vocab);
  // A text file tokenized with `tok` (BOS at the start of the file, no EOS).
  static TokenData from_text(const std::string& path, const Tokenizer& tok, int64_t vocab);
  static TokenData from_ids(std::vector<int32_t> ids, int64_t vocab);

  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  const std::vector<int32_t>& ids() const { return ids_; }
  // floor((n-1)/S); throws std::invalid_argument naming `what` (the file) when it is 0.
  int64_t sequences(int64_t S) const;

 private:
  std::vector<int32_t> ids_;
  std::string path_;
};

struct BatchOrder {
  int64_t seq_len = 0;            // S
  int64_t global_batch = 0;       // G, sequences per step
  int64_t micro_batch = 0;        // M, sequences per micro-batch
  int dp = 1;                     // data-parallel ranks
  bool shuffle = false;
  uint64_t seed = 0;
  // Throws std::invalid_argument naming the flags when G is not a multiple of M * dp.
  void check() const;
  int64_t micro_batches() const { return global_batch / (micro_batch * dp); }
  // The sequence index (in [0, count)) of the i-th sequence of micro-batch `micro` of DP rank
  // `dp_rank` at step `step`.
  int64_t sequence(int64_t step, int dp_rank, int64_t micro, int64_t i, int64_t count) const;
};

// Fills inputs and targets [M * S] for that micro-batch.
void fill_micro_batch(const TokenData& data, const BatchOrder& order, int64_t step, int dp_rank,
                      int64_t micro, int32_t* inputs, int32_t* targets);

}  // namespace parallm::train
