#!/usr/bin/env bash
# Runs openai_client_test.mjs (the official `openai` npm client, pinned) against a server.
#
#   openai_client_test.sh URL [--expected FILE] [--prompt TEXT] [--max-tokens N] [--api-key KEY]
#       against a running server, e.g. `parallm serve` (the lead's end-to-end check);
#   openai_client_test.sh --fake PATH/TO/parallm_fake_server
#       starts the fake-engine server on an ephemeral port (with an API key) and runs against it.
#
# The package is installed with npm into $PARALLM_NPM_CACHE (default ~/.cache/parallm-npm).
# Exit 77 (ctest: skipped) when node/npm are missing or the registry cannot be reached.
set -euo pipefail
# PARALLM_NO_SKIP=1 (CI, which installs every prerequisite) turns a skip into a failure.
skip() {
  echo "openai_client_test: $1; skipped"
  [ "${PARALLM_NO_SKIP:-0}" = 1 ] && { echo "openai_client_test: PARALLM_NO_SKIP=1: failing"; exit 1; }
  exit 77
}
OPENAI_VERSION=4.95.0
here="$(cd "$(dirname "$0")" && pwd)"
cache="${PARALLM_NPM_CACHE:-$HOME/.cache/parallm-npm}/openai-$OPENAI_VERSION"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  skip "node and npm are needed (apt-get install nodejs npm)"
fi
# ctest runs two tests that call this script at once: one installs under a lock while the other
# waits (two npm installs into one folder break each other, ENOTEMPTY, and leave a package whose
# dependencies are missing), and a folder counts as installed only once npm has finished there.
mkdir -p "$(dirname "$cache")"
exec 9>"$cache.lock"
flock 9
if [ ! -f "$cache/.installed" ]; then
  rm -rf "$cache"
  mkdir -p "$cache"
  if ! npm install --prefix "$cache" --no-audit --no-fund --loglevel=error --fetch-retries=1 \
      --fetch-timeout=30000 "openai@$OPENAI_VERSION" >"$cache/install.log" 2>&1; then
    tail -5 "$cache/install.log"
    skip "npm install openai@$OPENAI_VERSION failed (no registry?)"
  fi
  touch "$cache/.installed"
fi
# ESM resolves 'openai' from the script's own directory upwards: run a copy inside the cache.
cmp -s "$here/openai_client_test.mjs" "$cache/openai_client_test.mjs" ||
  cp "$here/openai_client_test.mjs" "$cache/openai_client_test.mjs"
flock -u 9
exec 9>&-

if [ "${1:-}" = "--fake" ]; then
  bin="$2"
  tmp="$(mktemp -d)"
  key="test-key-$$"
  "$bin" --port 0 --port-file "$tmp/port" --api-key "$key" --expected-out "$tmp/expected" \
    --expected-tokens 16 >"$tmp/server.log" 2>&1 &
  pid=$!
  trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
  for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.05; done
  [ -s "$tmp/port" ] || { echo "fake server did not start"; cat "$tmp/server.log"; exit 1; }
  rc=0
  node "$cache/openai_client_test.mjs" --base-url "http://127.0.0.1:$(cat "$tmp/port")" \
    --expected "$tmp/expected" --prompt "Once upon a time" --max-tokens 16 --api-key "$key" || rc=$?
  # SIGTERM must end the server promptly.
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then echo "FAIL: the server ignored SIGTERM for 5 s"; rc=1; fi
  exit $rc
fi

url="${1:?usage: openai_client_test.sh URL [--expected FILE] [--prompt TEXT] [--max-tokens N] [--api-key KEY]}"
shift
exec node "$cache/openai_client_test.mjs" --base-url "$url" "$@"
