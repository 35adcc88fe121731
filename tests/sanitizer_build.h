#pragma once

// PARALLM_SANITIZED is 1 in a build under ASan or TSan, with either compiler: GCC defines
// __SANITIZE_ADDRESS__ / __SANITIZE_THREAD__, clang answers __has_feature (CI's sanitizer build
// is clang's, a developer's may be GCC's).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PARALLM_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define PARALLM_SANITIZED 1
#endif
#endif
#ifndef PARALLM_SANITIZED
#define PARALLM_SANITIZED 0
#endif
