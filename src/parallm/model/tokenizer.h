// Tokenizer: text <-> token ids for the generation loop, with a streaming decoder.
//
// Implementations (one file each):
//   tokenizer_spm.cpp  sentencepiece tokenizer.model through libsentencepiece;
//   tokenizer_hf.cpp   Hugging Face tokenizer.json with a BPE model, either sentencepiece-style
//                      (LLaMA-1/2, TinyLlama, Mistral: "▁" for spaces, <0xNN> byte fallback) or
//                      byte-level (GPT-2, LLaMA-3: GPT-2 byte-to-unicode map, regex pre-split).
// The first rank of the first stage owns the tokenizer; other ranks only see ids.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace parallm {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Ids for `text`, with bos_id() in front when `add_bos` and the tokenizer has a BOS.
  // Special tokens written in the text ("<s>", "<|begin_of_text|>") become their ids for
  // tokenizer.json; sentencepiece treats them as plain text, as libsentencepiece does.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos) const = 0;

  // Text of a whole sequence. Control/special tokens (BOS, EOS, ...) produce no text, the space
  // the encoder put in front of the first word is removed, byte pieces (<0xNN>) are joined into
  // UTF-8 and bytes that do not form valid UTF-8 become U+FFFD. Throws std::invalid_argument for
  // an id outside [0, vocab_size()).
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;

  // Text for `id` when it follows `prev` (-1: nothing before it), for streaming output. The
  // leading space of a word piece is dropped when it opens the text (prev is -1 or a
  // special token). Byte pieces come back as raw bytes, so a result may hold part of a UTF-8
  // character: feed the results through TokenStreamer (below) to get only whole characters.
  // Concatenating decode_token over a sequence that starts with -1 and has specials only at its
  // front gives the bytes of decode().
  virtual std::string decode_token(int32_t prev, int32_t id) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when the tokenizer has none
  virtual int32_t eos_id() const = 0;  // -1 when the tokenizer has none

  // Every id that ends a generation (LLaMA-3 instruct lists several in config.json); eos_id()
  // is the first of them.
  virtual std::vector<int32_t> eos_ids() const {
    return eos_id() >= 0 ? std::vector<int32_t>{eos_id()} : std::vector<int32_t>{};
  }
  // The vocabulary entry for `id` as stored ("▁Hello", "Ġworld", "<0x0A>", "<s>"); "" if none.
  virtual std::string id_to_piece(int32_t /*id*/) const { return ""; }
  // The id of a vocabulary entry or special token spelled exactly `piece`; -1 if there is none.
  virtual int32_t piece_to_id(std::string_view /*piece*/) const { return -1; }
};

// Finds a tokenizer for a model: `model_path` is the model directory or a file inside it;
// tokenizer.json (Hugging Face) is preferred, then tokenizer.model (sentencepiece). Returns
// nullptr if there is neither; throws if one is there but cannot be loaded.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_path);

// Loads an explicit file: *.model -> sentencepiece, *.json -> Hugging Face tokenizer.json.
// Throws std::runtime_error naming the file when it is missing or unreadable,
// std::invalid_argument naming the file and field when its content is not supported.
std::unique_ptr<Tokenizer> load_tokenizer_file(const std::string& file);

// Turns the raw per-token strings of decode_token into whole UTF-8 characters: a character
// split across byte tokens is held back until its last byte arrives; bytes that can never form
// a character become U+FFFD, as in decode(). Concatenating every push() and finish() gives
// decode(ids) for a sequence whose specials are at its front.
//   TokenStreamer s(tok); for (id : ids) out << s.push(id); out << s.finish();
class TokenStreamer {
 public:
  explicit TokenStreamer(const Tokenizer& tokenizer) : tokenizer_(&tokenizer) {}

  // Text that became complete with `id` (may be empty).
  std::string push(int32_t id);
  // Whatever is still held back (an unfinished character becomes U+FFFD); resets the stream.
  std::string finish();

 private:
  const Tokenizer* tokenizer_;
  int32_t prev_ = -1;
  std::string pending_;  // bytes of an unfinished UTF-8 character, at most 3
};

}  // namespace parallm
