// parallm tokenize: text -> a raw little-endian token file (the training data format,
// docs/training.md). parallm tokenizer train: a sentencepiece tokenizer.model from a text file,
// through libsentencepiece's trainer.
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string_view>
#include <system_error>

#include "parallm/cli/command.h"
#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"
#include "parallm/model/tokenizer.h"
#include "parallm/train/data.h"

namespace parallm::cli {
namespace {

namespace fs = std::filesystem;

// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
// failure (or a refused input) never leaves a half-written or clobbered output behind.
template <class WriteFn>
void write_atomically(const std::string& path, std::string_view component, WriteFn write) {
  const std::string tmp = path + ".tmp";
  try {
    write(tmp);
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail<std::runtime_error>(component, path, ": cannot write (", ec.message(), ")");
  }
}

// ---- parallm tokenize ----

struct TokenizeOptions {
  std::string model, tokenizer, in, out, dtype = "u16";
  int threads = 0;
};

int run_tokenize(const TokenizeOptions& o) {
  if (o.model.empty() == o.tokenizer.empty())
    fail("tokenize", "give exactly one of --model DIR and --tokenizer FILE");
  const train::TokenFileType type = train::parse_token_file_type(o.dtype, "--data-dtype");
  std::unique_ptr<Tokenizer> tok =
      o.model.empty() ? load_tokenizer_file(o.tokenizer) : load_tokenizer(o.model);
  if (!tok) fail("tokenize", "--model ", o.model, ": no tokenizer.json or tokenizer.model in it");
  const int64_t vocab = tok->vocab_size();
  if (type == train::TokenFileType::U16 && vocab > 65536) {
    fail("tokenize", "--data-dtype u16 holds ids below 65536 but the tokenizer has ", vocab,
         " tokens; use --data-dtype u32");
  }
  ThreadPool pool(o.threads > 0 ? o.threads : ThreadPool::hardware_threads());
  ScopedPool scoped(pool);
  Timer t;
  const auto data = train::TokenData::from_text(o.in, *tok, vocab);
  write_atomically(o.out, "tokenize",
                   [&](const std::string& tmp) { train::write_token_file(tmp, data.ids(), type); });
  const uint64_t text_bytes = fs::file_size(o.in);
  std::printf(
      "wrote %s: %lld tokens (%s, vocabulary %lld) from %llu bytes of text, %.2f bytes per "
      "token, in %.1f s\n",
      o.out.c_str(), static_cast<long long>(data.size()), o.dtype.c_str(),
      static_cast<long long>(vocab), static_cast<unsigned long long>(text_bytes),
      data.size() ? static_cast<double>(text_bytes) / static_cast<double>(data.size()) : 0.0,
      t.seconds());
  return 0;
}

[[maybe_unused]] const bool tokenize_registered = register_command(
    {"tokenize", "Tokenize a text file into a raw token file for --data (u16 or u32 ids)",
     [](CLI::App& app) {
       auto o = std::make_shared<TokenizeOptions>();
       auto* model = app.add_option("--model", o->model,
                                    "Model directory whose tokenizer to use (tokenizer.json or "
                                    "tokenizer.model)");
       app.add_option("--tokenizer", o->tokenizer, "A tokenizer file (*.model or *.json) instead")
           ->excludes(model);
       app.add_option("--in", o->in, "Text file (UTF-8)")->required();
       app.add_option("--out", o->out, "Token file to write")->required();
       app.add_option("--data-dtype", o->dtype, "u16 (default; vocabularies up to 65536) or u32")
           ->check(CLI::IsMember({"u16", "u32"}));
       app.add_option("--threads", o->threads, "Encoding threads (default: all hardware threads)");
       return [o] { return run_tokenize(*o); };
     }});

// ---- parallm tokenizer train ----

// Lines of the text, empty ones skipped (sentencepiece trains on "sentences"; the KJV has one
// verse a line).
class LineIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::string& text) : text_(text) { advance(); }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }
  int64_t lines() const { return lines_; }

 private:
  void advance() {
    while (pos_ < text_.size()) {
      size_t end = text_.find('\n', pos_);
      if (end == std::string::npos) end = text_.size();
      line_.assign(text_, pos_, end - pos_);
      pos_ = end + 1;
      if (!line_.empty() && line_.back() == '\r') line_.pop_back();
      if (!line_.empty()) {
        ++lines_;
        return;
      }
    }
    done_ = true;
    line_.clear();
  }

  const std::string& text_;
  size_t pos_ = 0;
  std::string line_;
  bool done_ = false;
  int64_t lines_ = 0;
};

struct TrainOptions {
  std::string in, out, model_type = "bpe";
  int64_t vocab_size = 0;
  double character_coverage = 1.0;
  bool byte_fallback = false;
  int threads = 0;
};

// --out: an existing directory (or one ending in '/') gets DIR/tokenizer.model; a path ending in
// ".model" is the file itself; anything else is a prefix, PREFIX.model.
std::string model_path(const std::string& out) {
  std::error_code ec;
  if (!out.empty() && (out.back() == '/' || fs::is_directory(out, ec)))
    return (fs::path(out) / "tokenizer.model").string();
  if (fs::path(out).extension() == ".model") return out;
  return out + ".model";
}

int run_tokenizer_train(const TrainOptions& o) {
  if (o.vocab_size < 8 || o.vocab_size > (int64_t{1} << 24))
    fail("tokenizer", "--vocab-size ", o.vocab_size, " must be in [8, 16777216]");
  if (!(o.character_coverage > 0 && o.character_coverage <= 1))
    fail("tokenizer", "--character-coverage ", o.character_coverage, " must be in (0, 1]");
  const std::string file = model_path(o.out);
  if (const auto parent = fs::path(file).parent_path(); !parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) fail<std::runtime_error>("tokenizer", parent.string(), ": ", ec.message());
  }
  uint64_t size = 0;
  ::close(open_regular_file(o.in, "tokenizer", &size));  // missing --in: the user's mistake
  const std::string text = read_text_file(o.in, train::kMaxTextFileBytes, "tokenizer");
  const int threads = o.threads > 0 ? o.threads : ThreadPool::hardware_threads();
  Timer t;
  LineIterator lines(text);
  if (lines.done()) fail("tokenizer", "--in ", o.in, ": no text to train on");
  // The LLaMA conventions the rest of parallm expects: <unk> 0, <s> 1, </s> 2, no padding id.
  // nmt_nfkc (sentencepiece's default) folds whitespace runs and newlines into one space, which
  // is what decoding gives back.
  std::string proto;
  const auto status = sentencepiece::SentencePieceTrainer::Train(
      {{"model_type", o.model_type},
       {"vocab_size", std::to_string(o.vocab_size)},
       {"character_coverage", cat(o.character_coverage)},
       {"byte_fallback", o.byte_fallback ? "true" : "false"},
       {"unk_id", "0"},
       {"bos_id", "1"},
       {"eos_id", "2"},
       {"pad_id", "-1"},
       {"num_threads", std::to_string(threads)},
       {"minloglevel", "1"}},
      &lines, &proto);
  if (!status.ok()) {
    fail("tokenizer", "--in ", o.in, " --vocab-size ", o.vocab_size,
         ": sentencepiece could not train: ", status.ToString());
  }
  write_atomically(file, "tokenizer", [&](const std::string& tmp) {
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail<std::runtime_error>("tokenizer", tmp, ": cannot open for writing");
    const bool ok = std::fwrite(proto.data(), 1, proto.size(), f) == proto.size();
    if (std::fclose(f) != 0 || !ok) fail<std::runtime_error>("tokenizer", tmp, ": write failed");
  });
  // Load it back through parallm's own loader: what `tokenize` and `generate` will see.
  const auto tok = load_tokenizer_file(file);
  std::printf("wrote %s: %s, vocabulary %d, trained on %lld lines (%zu bytes) in %.1f s\n",
              file.c_str(), o.model_type.c_str(), tok->vocab_size(),
              static_cast<long long>(lines.lines()), text.size(), t.seconds());
  return 0;
}

[[maybe_unused]] const bool train_registered = register_command(
    {"tokenizer train", "Train a sentencepiece tokenizer (tokenizer.model) on a text file",
     [](CLI::App& app) {
       auto o = std::make_shared<TrainOptions>();
       app.add_option("--in", o->in, "Text file, one sentence (or paragraph) a line")->required();
       app.add_option("--vocab-size", o->vocab_size, "Vocabulary size, specials included")
           ->required();
       app.add_option("--out", o->out,
                      "Directory (writes DIR/tokenizer.model), FILE.model, or a prefix")
           ->required();
       app.add_option("--model-type", o->model_type, "bpe (default, as LLaMA's) or unigram")
           ->check(CLI::IsMember({"bpe", "unigram"}));
       app.add_option("--character-coverage", o->character_coverage,
                      "Share of characters the vocabulary covers (default 1.0)");
       app.add_flag("--byte-fallback", o->byte_fallback,
                    "Add the 256 <0xNN> byte pieces so any text encodes without <unk>");
       app.add_option("--threads", o->threads, "Trainer threads (default: all hardware threads)");
       return [o] { return run_tokenizer_train(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
