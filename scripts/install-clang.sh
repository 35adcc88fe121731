#!/usr/bin/env bash
# Installs clang and its sanitizer runtimes where missing (Debian's clang only recommends the
# runtimes, and install-packages.sh installs without recommends). CI builds the unit tests under
# ASan+UBSan with clang (.ci/run) and the fuzzers with clang's libFuzzer (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang++ >/dev/null || bash scripts/install-packages.sh clang
# libFuzzer and the ASan/UBSan runtimes: libclang-rt-N-dev where Debian splits them out of
# libclang-common-N-dev (the package does not exist where they are not split out).
if [ ! -e "$(clang++ -print-resource-dir)/lib/linux/libclang_rt.fuzzer-x86_64.a" ] &&
  [ -z "$(clang++ -print-file-name=libclang_rt.fuzzer-x86_64.a | grep /)" ]; then
  bash scripts/install-packages.sh "libclang-rt-$(clang++ -dumpversion | cut -d. -f1)-dev"
fi
