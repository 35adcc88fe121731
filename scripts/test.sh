#!/usr/bin/env bash
# Builds (if needed) and runs the whole test suite with ctest.
# Usage: bash scripts/test.sh [BUILD_DIR] [ctest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build}
shift || true
[ -f "$BUILD_DIR/CMakeCache.txt" ] || bash scripts/setup.sh "$BUILD_DIR"
cmake --build "$BUILD_DIR" -j "$(nproc)"
cd "$BUILD_DIR"
ctest -j "$(nproc)" --output-on-failure --timeout 600 "$@"
