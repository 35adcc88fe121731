// Bounded reading of text and JSON inputs: every file read with a length limit (only regular
// files: a FIFO or /dev/zero is refused before it blocks or fills memory), JSON nesting bounded
// before parsing, and error messages that describe a bad value without printing it recursively.
//
// nlohmann's parser itself is iterative (1e6 levels parse), but dump(), copies and comparisons
// recurse and overflow the stack near 3e5 levels; no configuration of ours nests deeper than a
// handful of levels, so documents deeper than kMaxJsonDepth are refused by a cheap bracket scan.
// Meant for every JSON loader (hardware, calibration, config.json, safetensors headers, indexes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace parallm {

constexpr size_t kMaxJsonDepth = 256;
constexpr size_t kMaxJsonFileBytes = size_t(64) << 20;  // 64 MiB: far above any config

// What a file mode names when it is not a regular file ("a directory", "a FIFO", "a character
// device", ...), or "" for a regular file.
std::string non_regular_kind(unsigned mode);

// Opens `path` read-only, refusing anything but a regular file after an O_NONBLOCK open (so a
// FIFO never blocks), naming the path and what it is; returns the descriptor (the caller closes
// it) and sets *size. A missing file is std::invalid_argument (a wrong path given) unless
// `missing_is_environment` (std::runtime_error).
int open_regular_file(const std::string& path, std::string_view component, uint64_t* size,
                      bool missing_is_environment = false);

// The whole of the regular file `path`, at most `max_bytes`. Throws std::runtime_error
// "[component] path: cannot open file" / "is not a regular file", std::invalid_argument
// "[component] path: larger than N bytes (the limit for this input)".
std::string read_text_file(const std::string& path, size_t max_bytes, std::string_view component);

// Throws std::invalid_argument "[component] source: JSON nested deeper than N levels (at byte K)"
// when brackets outside strings nest deeper than max_depth. Linear, no allocation.
void check_json_depth(std::string_view text, size_t max_depth, std::string_view component,
                      std::string_view source);

// Depth check, then parse; a syntax error is std::invalid_argument
// "[component] source: invalid JSON: ...".
nlohmann::json parse_json_text(std::string_view text, std::string_view component,
                               std::string_view source, size_t max_depth = kMaxJsonDepth);

// read_text_file + parse_json_text.
nlohmann::json read_json_file(const std::string& path, std::string_view component,
                              size_t max_bytes = kMaxJsonFileBytes,
                              size_t max_depth = kMaxJsonDepth);

// A short description of `j` for an error message, never recursive and at most about max_chars:
// numbers, booleans and null as written, strings quoted and truncated ("abc..."), arrays and
// objects by type and size ("an array of 3 elements", "an object of 2 fields").
std::string json_preview(const nlohmann::json& j, size_t max_chars = 40);

// "prefix.field" ("field" when prefix is empty) and "prefix[i]": paths of fields in messages,
// e.g. json_path(json_path("devices", 0), "mem_bw") == "devices[0].mem_bw".
std::string json_path(std::string_view prefix, std::string_view field);
std::string json_path(std::string_view prefix, size_t index);

}  // namespace parallm
