#!/usr/bin/env bash
# Installs the Debian packages that building and running parallm need (idempotent) and builds the
# library and the `parallm` binary in Release into build/. The tests are not built here:
# scripts/test.sh installs what they need (GoogleTest, PyTorch) and builds them.
# Usage: bash scripts/setup.sh [BUILD_DIR] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Every package whose headers, libraries or programs the build uses, named (not left to arrive as
# a dependency of another): compiler and build tools; BLAS (GEMM); MPI (the multi-process
# backend, and mpirun); JSON, CLI parsing, formatting; sentencepiece (tokenizer.model); PCRE2
# (the regex pre-split of tokenizer.json); cpp-httplib (the HTTP server of `parallm serve`).
RUN_PACKAGES=(build-essential cmake pkg-config
  libopenblas-dev libopenmpi-dev openmpi-bin
  nlohmann-json3-dev libcli11-dev libfmt-dev libsentencepiece-dev libpcre2-dev libcpp-httplib-dev)
bash scripts/install-packages.sh "${RUN_PACKAGES[@]}"

BUILD_DIR=${1:-build}
shift || true
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DPARALLM_TESTS=OFF "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
echo "setup: built $BUILD_DIR/parallm"
