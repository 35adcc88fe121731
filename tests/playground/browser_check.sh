#!/usr/bin/env bash
# Runs browser_test.mjs (headless Chromium driven by playwright-core, pinned in package.json and
# package-lock.json here) against `parallm playground`, with a real `parallm train --pp 2 --trace`
# file to load. Screenshots go to OUT_DIR.
#
#   browser_check.sh PATH/TO/parallm OUT_DIR
#   browser_check.sh --install-only     (scripts/test.sh: fetch playwright-core into the cache)
#
# Chromium is Debian's (/usr/bin/chromium, or $PARALLM_CHROMIUM; scripts/test.sh installs it).
# Exit 77 (ctest: skipped) when Chromium is missing, or node/npm are missing or the registry
# cannot be reached for playwright-core; any other failure fails.
set -euo pipefail
# PARALLM_NO_SKIP=1 (CI, which installs every prerequisite) turns a skip into a failure.
skip() {
  echo "browser_check: $1; skipped"
  [ "${PARALLM_NO_SKIP:-0}" = 1 ] && { echo "browser_check: PARALLM_NO_SKIP=1: failing"; exit 1; }
  exit 77
}
here="$(cd "$(dirname "$0")" && pwd)"
install_only=0
[ "${1:-}" = "--install-only" ] && install_only=1
chromium="${PARALLM_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ] && [ $install_only = 0 ]; then
  skip "no Chromium at $chromium (apt-get install chromium)"
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  skip "node and npm are needed"
fi
version="$(sed -n 's/.*"playwright-core": "\([^"]*\)".*/\1/p' "$here/package.json")"
cache="${PARALLM_NPM_CACHE:-$HOME/.cache/parallm-npm}/playground-playwright-core-$version"
if [ ! -f "$cache/node_modules/playwright-core/package.json" ]; then
  mkdir -p "$cache"
  cp "$here/package.json" "$here/package-lock.json" "$cache/"
  if ! (cd "$cache" && npm ci --no-audit --no-fund --loglevel=error --fetch-retries=1 \
      --fetch-timeout=30000 >install.log 2>&1); then
    tail -5 "$cache/install.log"
    skip "npm ci (playwright-core $version) failed (no registry?)"
  fi
fi
[ $install_only = 1 ] && exit 0
bin="$(realpath "$1")"
out="$(mkdir -p "$2" && realpath "$2")"
# ESM resolves 'playwright-core' from the script's own directory upwards: run a copy in the cache.
cp "$here/browser_test.mjs" "$cache/browser_test.mjs"

tmp="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
# A real trace: 2 steps of a tiny model over 2 pipeline stages (1F1B, 4 micro-batches).
/usr/bin/python3 -c "
import struct; open('$tmp/tok.bin', 'wb').write(struct.pack('<2048H', *[(i * 7919) % 250 for i in range(2048)]))"
"$bin" train --init tiny --data "$tmp/tok.bin" --pp 2 --steps 2 --global-batch-size 4 --seq-len 32 \
  --threads 1 --trace "$tmp/train-trace.json" >"$tmp/train.log" 2>&1 ||
  { cat "$tmp/train.log"; exit 1; }
cp "$tmp/train-trace.json" "$out/train-trace.json"
# And one without pipeline actions: generate on 2 TP ranks (layer, collective spans).
"$bin" generate --model "$here/../../models/stories260K/stories260K.bin" --prompt-ids 1 \
  --max-tokens 4 --tp 2 --threads 1 --trace "$tmp/generate-trace.json" >"$tmp/gen.log" 2>&1 ||
  { cat "$tmp/gen.log"; exit 1; }

"$bin" playground --port 0 >"$tmp/server.log" 2>&1 &
pid=$!
url=""
for _ in $(seq 100); do
  url="$(grep -o 'http://[^ ]*/' "$tmp/server.log" || true)"
  [ -n "$url" ] && break
  sleep 0.05
done
[ -n "$url" ] || { echo "playground did not start"; cat "$tmp/server.log"; exit 1; }
node "$cache/browser_test.mjs" "${url%/}" "$tmp/train-trace.json" "$out" "$tmp/generate-trace.json"
echo "screenshots: $out"
