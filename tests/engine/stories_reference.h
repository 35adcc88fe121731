// stories260K's greedy tokens from prompt {1} (BOS), as llama2.c's README prints them: the
// reference that the parallel layouts are held to.
#pragma once

#include <cstdint>
#include <vector>

namespace parallm::testing {

inline const std::vector<int32_t> kStoriesLlama2cTokens = {
    461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264,
    283, 452, 288, 13,  431, 431, 431, 431, 431, 431, 431, 431, 431, 431, 431, 431,
    431, 293, 430, 417, 363, 416, 315, 342, 418, 424, 400, 442, 402, 303, 266, 299,
    374, 466, 396, 303, 271, 362, 390, 469, 306, 469, 423, 314, 347, 305, 356, 333};

// The first n of them.
inline std::vector<int32_t> stories_llama2c_tokens(size_t n) {
  return {kStoriesLlama2cTokens.begin(), kStoriesLlama2cTokens.begin() + n};
}

}  // namespace parallm::testing
