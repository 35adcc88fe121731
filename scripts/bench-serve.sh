#!/usr/bin/env bash
# Serving throughput (issue 14's performance goals), against a real `parallm serve` on loopback:
#   1. output tokens/s with 1, 4 and 16 concurrent clients (each sends 2 requests, all at once),
#      against the batch-1 decode tokens/s of `parallm bench decode` on the same model and threads;
#      goal: 16 clients >= 4x batch-1 decode, and rising from 1 to 4 to 16;
#   2. under --pp 2: 8 concurrent clients against 1; goal >= 1.5x;
#   3. TTFT / TPOT / ITL (p50, p99) at a fixed Poisson rate.
# Usage: MODEL=DIR bash scripts/bench-serve.sh   (env: THREADS=2 IN=32 OUT=32 RATE=1
#        PARALLM=./build/parallm). MODEL needs a tokenizer beside it (or TOKENIZER=FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${PARALLM:-./build/parallm}
MODEL=${MODEL:?MODEL=DIR: a model directory with a tokenizer}
THREADS=${THREADS:-2} IN=${IN:-32} OUT=${OUT:-32} RATE=${RATE:-1}
tok=()
[ -n "${TOKENIZER:-}" ] && tok=(--tokenizer "$TOKENIZER")
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

start_server() {  # extra serve flags...; sets pid and port
  "$B" serve --model "$MODEL" "${tok[@]}" --port 0 --max-num-seqs 16 "$@" >"$work/serve.log" 2>&1 &
  pid=$!
  port=
  for _ in $(seq 1 600); do
    port=$(grep -oE '127\.0\.0\.1:[0-9]+' "$work/serve.log" | head -1 | cut -d: -f2 || true)
    if [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null; then return; fi
    kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
    sleep 0.2
  done
  echo "server did not become ready"; cat "$work/serve.log"; exit 1
}
stop_server() { kill -TERM "$pid"; wait "$pid" || true; pid=; }

# One bench serve run; prints "output_throughput median_ttft p99_ttft median_tpot p99_tpot".
bench() {  # concurrency num_prompts rate
  "$B" bench serve --port "$port" --max-concurrency "$1" --num-prompts "$2" --request-rate "$3" \
    --random-input-len "$IN" --random-output-len "$OUT" --seed 1 --result-file "$work/r.json" \
    >"$work/bench.log" 2>&1 || { cat "$work/bench.log"; exit 1; }
  /usr/bin/python3 -c "import json; r = json.load(open('$work/r.json')); \
assert r['failed'] == 0 if 'failed' in r else True, r; \
print('%.2f %.1f %.1f %.1f %.1f %d' % (r['output_throughput'], r['median_ttft_ms'], r['p99_ttft_ms'], \
r['median_tpot_ms'], r['p99_tpot_ms'], r['completed']))"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

echo "== model $MODEL, $THREADS threads in all, prompts $IN tokens, outputs $OUT tokens"
dec=$("$B" bench decode --model "$MODEL" --threads "$THREADS" --tokens 16 --warmup 2 2>&1 |
  awk '/tokens\/s/ { print $2; exit }')
echo "batch-1 decode (bench decode): $dec tokens/s"

start_server --threads "$THREADS"
printf '%-28s %10s %8s %10s %10s %10s %10s\n' run "out tok/s" "x dec" "TTFT p50" "TTFT p99" "TPOT p50" "TPOT p99"
for c in 1 4 16; do
  read -r tput t50 t99 p50 p99 n <<<"$(bench "$c" $((2 * c)) inf)"
  printf '%-28s %10s %8s %10s %10s %10s %10s\n' "tp1 pp1, $c clients ($n req)" "$tput" \
    "$(ratio "$tput" "$dec")" "$t50" "$t99" "$p50" "$p99"
done
read -r tput t50 t99 p50 p99 n <<<"$(bench 16 16 "$RATE")"
printf '%-28s %10s %8s %10s %10s %10s %10s\n' "tp1 pp1, Poisson $RATE/s ($n)" "$tput" \
  "$(ratio "$tput" "$dec")" "$t50" "$t99" "$p50" "$p99"
stop_server

start_server --pp 2 --threads $((THREADS / 2 > 0 ? THREADS / 2 : 1))
one=
for c in 1 8; do
  read -r tput t50 t99 p50 p99 n <<<"$(bench "$c" $((2 * c)) inf)"
  [ -z "$one" ] && one=$tput
  printf '%-28s %10s %8s %10s %10s %10s %10s   (x 1 client: %s)\n' "pp2, $c clients ($n req)" \
    "$tput" "$(ratio "$tput" "$dec")" "$t50" "$t99" "$p50" "$p99" "$(ratio "$tput" "$one")"
done
stop_server
