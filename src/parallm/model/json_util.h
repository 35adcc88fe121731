// JSON helpers shared by the model loaders (safetensors header, sharded index, config.json,
// tokenizer.json): bounded nesting checked before parsing, short non-recursive previews of values
// for error messages, and reading only regular files with a size limit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace parallm {

// Deeper nesting than this is refused before parsing: real model files nest a few levels, and
// nlohmann's recursive parser (and recursive dump / destruction) can overflow the stack on ~65k.
constexpr int kMaxJsonDepth = 256;

// The deepest bracket nesting of `text` ('[' and '{' outside strings), scanning without recursion
// and stopping as soon as `limit` is passed (then returns limit + 1).
int json_nesting_depth(std::string_view text, int limit = kMaxJsonDepth);

// Parses `text` as JSON, or throws std::invalid_argument "[component] source: ..." when it nests
// deeper than kMaxJsonDepth or is not valid JSON.
nlohmann::json parse_json_bounded(std::string_view text, std::string_view component,
                                  const std::string& source);

// A value for an error message: scalars as JSON cut to `max_chars`, containers as their type and
// size ("an array of 3", "an object of 2"); never recursive, so any depth is safe to print.
std::string json_preview(const nlohmann::json& v, size_t max_chars = 40);

// What a path names when it is not a regular file ("a directory", "a FIFO", "a character
// device", ...), or "" when it is a regular file. Does not follow into opening the file.
std::string non_regular_kind(unsigned mode);

// Reads a whole regular file of at most `max_bytes` bytes. A FIFO, a device or a directory is
// refused by fstat after an O_NONBLOCK open (so a FIFO never blocks), naming the path and what
// it is. Missing or unreadable: std::runtime_error (a missing config.json or tokenizer is the
// environment's fault); wrong kind or too large: std::invalid_argument.
std::string read_regular_file(const std::string& path, std::string_view component,
                              uint64_t max_bytes);

// Opens `path` read-only for mapping or reading, refusing anything but a regular file as above;
// returns the descriptor (the caller closes it) and sets *size. A missing file is
// std::invalid_argument (a wrong path given) unless `missing_is_environment`.
int open_regular_file(const std::string& path, std::string_view component, uint64_t* size,
                      bool missing_is_environment = false);

}  // namespace parallm
