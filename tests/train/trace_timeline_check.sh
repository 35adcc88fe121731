#!/usr/bin/env bash
# scripts/trace-timeline.py on a real trace: a 2-stage ZB-H1 bench run's --trace is drawn with one
# row per stage and its F, B and W blocks; a trace without pipeline actions is refused by name.
# Usage: trace_timeline_check.sh PARALLM_BIN SCRIPT
set -euo pipefail
bin=$1 script=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$bin" bench train --init tiny --pp 2 --schedule zb-h1 --seq-len 16 --micro-batch-size 1 \
  --threads 1 --steps 1 --warmup 1 --trace "$tmp/t.json" >/dev/null 2>&1
python3 "$script" "$tmp/t.json" "$tmp/t.svg" --steps 2
for want in '>stage 0<' '>stage 1<' 'fill="#4c78a8"' 'fill="#f58518"' 'fill="#e45756"' 'idle '; do
  grep -q "$want" "$tmp/t.svg" || { echo "FAIL: the timeline has no $want"; exit 1; }
done
# Each row holds the last step's actions only: 3 x m = 12 blocks (bench train: m = 2 x pp = 4).
n=$(grep -c '<rect' "$tmp/t.svg")
[ "$n" -eq 24 ] || { echo "FAIL: $n blocks drawn, expected 24 (2 stages x 3 x 4 micro-batches)"; exit 1; }
echo '[]' >"$tmp/empty.json"
if python3 "$script" "$tmp/empty.json" "$tmp/e.svg" --steps 1 2>"$tmp/err"; then
  echo "FAIL: an empty trace was accepted"; exit 1
fi
grep -q "has no F/B/W compute spans" "$tmp/err" || { echo "FAIL: $(cat "$tmp/err")"; exit 1; }
echo "trace timeline ok"
