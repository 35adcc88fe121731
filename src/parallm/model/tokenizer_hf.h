// Hugging Face tokenizer.json with a BPE model, in the two shapes LLaMA-family models use.
//
// Sentencepiece-style BPE (LLaMA-1/2, TinyLlama, Mistral):
//   normalizer  Sequence[Prepend "▁", Replace " " -> "▁"] (either alone is accepted too), or
//   pre_tokenizer Metaspace (replacement "▁"; prepend_scheme always/first/never or the older
//   add_prefix_space; split true or false);
//   model       BPE with "▁" for spaces, byte_fallback with <0xNN> tokens, unk_token, fuse_unk.
// Byte-level BPE (GPT-2, LLaMA-3):
//   pre_tokenizer ByteLevel (use_regex true: the GPT-2 split; add_prefix_space) or
//   Sequence[Split (any regex or string, behavior Isolated; run by PCRE2, bpe_split.h),
//   ByteLevel (use_regex false)];
//   model       BPE over the GPT-2 byte-to-unicode alphabet, ignore_merges honoured.
// Both: merges as "a b" strings or ["a", "b"] pairs; added_tokens matched in the text before
// anything else (leftmost, then longest; lstrip/rstrip/single_word honoured; matched on the raw
// text even when "normalized" is true); decoding skips tokens marked "special".
// BOS: the special token that the post_processor's TemplateProcessing puts first, else
// bos_token_id of config.json beside the file, else bos_token of tokenizer_config.json, else an
// added token named <s>, <|begin_of_text|> or <|startoftext|>. EOS likewise from config.json
// eos_token_id (an int or a list; generation_config.json's list joins eos_ids()), else
// tokenizer_config.json eos_token, else </s>, <|end_of_text|>, <|endoftext|>.
// Not supported, with an error naming the file and field: other model types (WordPiece,
// Unigram, WordLevel), normalizers other than Prepend/Replace (NFC, NFKC, Lowercase...),
// pre-tokenizers other than the above (Digits, Whitespace, Split with another behavior),
// continuing_subword_prefix / end_of_word_suffix. dropout is ignored (inference is
// deterministic).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "parallm/model/tokenizer.h"

namespace parallm {

// Throws std::runtime_error when `file` cannot be read, std::invalid_argument naming the file
// and the field when it is not valid JSON or not a supported tokenizer.
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& file);

// BOS and EOS given by the caller (a GGUF's tokenizer.ggml.* ids) instead of found in the
// post-processor and the config files beside `file`, which are then not read. bos -1: none.
// Ids outside the vocabulary: std::invalid_argument naming `file`.
struct HfSpecialIds {
  int32_t bos = -1;
  std::vector<int32_t> eos;
};

// The same from the file's contents in `text` (config.json, tokenizer_config.json and
// generation_config.json are still looked for beside `file` unless `ids` gives BOS and EOS);
// load_hf_tokenizer() reads the file and calls this, the fuzzer (fuzz/tokenizer_json.cpp) calls it
// on bytes in memory, the GGUF reader on the tokenizer.json it writes for a gpt2 vocabulary.
std::unique_ptr<Tokenizer> parse_hf_tokenizer(std::string_view text, const std::string& file,
                                              const HfSpecialIds* ids = nullptr);

}  // namespace parallm
