#include "parallm/model/bpe_split.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "parallm/core/error.h"
#include "parallm/model/tokenizer_unicode.h"

namespace parallm {
namespace {

struct CodeFree {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct MatchDataFree {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};
using CodePtr = std::unique_ptr<pcre2_code, CodeFree>;
using MatchDataPtr = std::unique_ptr<pcre2_match_data, MatchDataFree>;

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  const int n = pcre2_get_error_message(code, buf, sizeof buf);
  return n < 0 ? cat("PCRE2 error ", code) : std::string(reinterpret_cast<const char*>(buf), n);
}

}  // namespace

struct SplitRegex::Compiled {
  std::string pattern;
  std::string where;
  CodePtr code;
};

SplitRegex::SplitRegex(std::string_view pattern, bool literal, std::string_view where)
    : compiled_(std::make_unique<Compiled>()) {
  compiled_->pattern = std::string(pattern);
  compiled_->where = std::string(where);
  // A literal needs no character classes (PCRE2 refuses UCP beside LITERAL).
  const uint32_t options =
      PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  int error = 0;
  PCRE2_SIZE offset = 0;
  compiled_->code.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                      options, &error, &offset, nullptr));
  if (!compiled_->code) {
    fail("tokenizer", where, ": regex \"", pattern, "\" does not compile: ", pcre2_message(error),
         " at offset ", offset);
  }
  // JIT where the platform has it (x86-64, arm64); pcre2_match falls back to the interpreter by
  // itself when it is missing, so a failure here only costs speed.
  pcre2_jit_compile(compiled_->code.get(), PCRE2_JIT_COMPLETE);
}

SplitRegex::~SplitRegex() = default;
SplitRegex::SplitRegex(SplitRegex&&) noexcept = default;
SplitRegex& SplitRegex::operator=(SplitRegex&&) noexcept = default;

const std::string& SplitRegex::pattern() const {
  return compiled_->pattern;
}

std::vector<std::string_view> SplitRegex::split(std::string_view text) const {
  std::vector<std::string_view> pieces;
  if (text.empty()) return pieces;
  const pcre2_code* code = compiled_->code.get();
  MatchDataPtr match(pcre2_match_data_create_from_pattern(code, nullptr));
  if (!match) fail<std::runtime_error>("tokenizer", "out of memory for PCRE2 match data");
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t cut = 0;  // end of the last piece
  for (size_t pos = 0; pos <= text.size();) {
    int rc = pcre2_match(code, subject, text.size(), pos, 0, match.get(), nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      // Deep backtracking outgrew the JIT's stack: the interpreter keeps its frames on the heap.
      rc = pcre2_match(code, subject, text.size(), pos, PCRE2_NO_JIT, match.get(), nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      fail("tokenizer", compiled_->where, ": regex \"", compiled_->pattern, "\" failed at byte ",
           pos, " of a ", text.size(), "-byte text: ", pcre2_message(rc));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.get());
    const size_t start = ovector[0], end = ovector[1];
    if (start < cut || end < start) {  // \K can move a match's start before its search start
      fail("tokenizer", compiled_->where, ": regex \"", compiled_->pattern, "\" reported a match [",
           start, ", ", end, ") that does not follow the last one (\\K?)");
    }
    if (start > cut) pieces.push_back(text.substr(cut, start - cut));  // the run between matches
    if (end > start) {
      pieces.push_back(text.substr(start, end - start));
      pos = end;
    } else {
      // An empty match cuts here; search on from the next character, or the search never moves.
      if (end == text.size()) break;
      char32_t cp;
      pos = end + unicode::decode_utf8(text, end, &cp);
    }
    cut = end;
  }
  if (cut < text.size()) pieces.push_back(text.substr(cut));
  return pieces;
}

}  // namespace parallm
