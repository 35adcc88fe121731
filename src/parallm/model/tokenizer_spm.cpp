#include "parallm/model/tokenizer_spm.h"

#include <sentencepiece_processor.h>

#include <filesystem>

#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"

namespace parallm {
namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // "▁", sentencepiece's space

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(const std::string& file, std::string_view bytes) : file_(file) {
    const auto status = sp_.LoadFromSerializedProto(bytes);
    if (!status.ok()) {
      fail<std::runtime_error>("tokenizer", file,
                               ": not a sentencepiece model: ", status.ToString());
    }
    vocab_size_ = sp_.GetPieceSize();
  }

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override {
    std::vector<int> ids;
    const auto status = sp_.Encode(text, &ids);
    if (!status.ok()) fail("tokenizer", file_, ": cannot encode text: ", status.ToString());
    std::vector<int32_t> out;
    out.reserve(ids.size() + 1);
    if (add_bos && bos_id() >= 0) out.push_back(bos_id());
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    for (int32_t id : ids) check_id(id);
    std::string text;
    const auto status = sp_.Decode(std::vector<int>(ids.begin(), ids.end()), &text);
    if (!status.ok()) fail("tokenizer", file_, ": cannot decode ids: ", status.ToString());
    return text;
  }

  std::string decode_token(int32_t prev, int32_t id) const override {
    check_id(id);
    if (sp_.IsControl(id)) return "";
    if (sp_.IsUnknown(id)) return sp_.DecodeIds({id});  // the unknown surface, " ⁇ "
    std::string_view piece = sp_.IdToPiece(id);
    if (sp_.IsByte(id)) {
      // "<0xNN>" -> the raw byte; TokenStreamer assembles the UTF-8 character.
      return std::string(
          1, static_cast<char>(std::stoi(std::string(piece.substr(3, 2)), nullptr, 16)));
    }
    // sentencepiece drops the space of the dummy prefix on the first piece that makes text.
    const bool opens_text = prev < 0 || (prev < vocab_size_ && sp_.IsControl(prev));
    if (opens_text && piece.substr(0, kSpace.size()) == kSpace) piece.remove_prefix(kSpace.size());
    std::string out;
    out.reserve(piece.size());
    for (size_t pos = 0; pos < piece.size();) {
      if (piece.substr(pos, kSpace.size()) == kSpace) {
        out += ' ';
        pos += kSpace.size();
      } else {
        out += piece[pos++];
      }
    }
    return out;
  }

  int32_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return sp_.bos_id(); }
  int32_t eos_id() const override { return sp_.eos_id(); }

  std::string id_to_piece(int32_t id) const override {
    return id >= 0 && id < vocab_size_ ? sp_.IdToPiece(id) : std::string();
  }
  int32_t piece_to_id(std::string_view piece) const override {
    const int id = sp_.PieceToId(piece);
    // PieceToId answers unk_id for an unknown piece: only the unknown piece itself maps there.
    if (id == sp_.unk_id() && sp_.IdToPiece(id) != piece) return -1;
    return id;
  }

 private:
  void check_id(int32_t id) const {
    if (id < 0 || id >= vocab_size_) {
      fail("tokenizer", file_, ": token id ", id, " is outside the vocabulary [0, ", vocab_size_,
           ")");
    }
  }

  std::string file_;
  sentencepiece::SentencePieceProcessor sp_;
  int32_t vocab_size_ = 0;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& file) {
  // Read here, from a regular file only and with a limit (core/json_limits.h), so a FIFO or device
  // given as the model is refused by name instead of blocking inside sentencepiece.
  constexpr uint64_t kMaxSpmBytes = uint64_t{1} << 30;
  return parse_sentencepiece_tokenizer(read_text_file(file, kMaxSpmBytes, "tokenizer"), file);
}

std::unique_ptr<Tokenizer> parse_sentencepiece_tokenizer(std::string_view bytes,
                                                         const std::string& file) {
  return std::make_unique<SentencePieceTokenizer>(file, bytes);
}

}  // namespace parallm
