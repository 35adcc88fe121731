#!/usr/bin/env bash
# Installs the Debian packages the tests need besides those of scripts/setup.sh (GoogleTest; Python
# with PyTorch for the reference forward pass and the MPI checks), builds parallm and its tests, and
# runs the whole suite with ctest.
# Usage: bash scripts/test.sh [BUILD_DIR] [ctest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build}
shift || true

[ -f "$BUILD_DIR/CMakeCache.txt" ] || bash scripts/setup.sh "$BUILD_DIR"
# libgtest-dev (and googletest, which it depends on): the test framework; python3-torch and
# python3-numpy: tests/reference/llama_ref.py; python3: also tests/engine/mpi_tp_check.sh;
# python3-jinja2: the chat template goldens (tests/reference/chat_template_ref.py); nodejs and npm:
# the `openai` npm client test of the server (tests/server/openai_client_test.sh) and the
# playground's browser test (tests/playground/browser_check.sh).
# A machine that already has node and npm (NodeSource's nodejs bundles npm, and conflicts with
# Debian's npm package) keeps them.
TEST_PACKAGES=(googletest libgtest-dev python3 python3-torch python3-numpy python3-jinja2)
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  TEST_PACKAGES+=(nodejs npm)
fi
bash scripts/install-packages.sh "${TEST_PACKAGES[@]}"
# Debian's chromium and the npm package playwright-core (pinned in tests/playground/): the
# playground's browser test, which is skipped (not failed) where either cannot be installed.
bash scripts/install-packages.sh chromium ||
  echo "test.sh: chromium could not be installed; the playground browser test will be skipped"
bash tests/playground/browser_check.sh --install-only ||
  echo "test.sh: playwright-core could not be installed; the playground browser test will be skipped"

cmake -S . -B "$BUILD_DIR" -DPARALLM_TESTS=ON >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
cd "$BUILD_DIR"
ctest -j "$(nproc)" --output-on-failure --timeout 600 "$@"
