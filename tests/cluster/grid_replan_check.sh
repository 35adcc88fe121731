#!/usr/bin/env bash
# scripts/cluster/grid_replan.py re-predicts a recorded grid (2026-12-03 14:07 UTC) with
# `parallm plan`: given the grid's own rates it gives back the grid's own predictions (all but a
# few of the 49 within 2%: the planner may have moved a little since, the parsing may not); given
# other rates it says so in its summary and its predictions move. Usage: grid_replan_check.sh PARALLM
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
grid=$src/tests/fixtures/cluster-grid-pp-split.txt
fail() { echo "grid_replan_check: $*" >&2; exit 1; }
own=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$grid" --parallm "$1")
n=$(echo "$own" | grep -vc '^#')
[ "$n" = 49 ] || fail "expected 49 decode points, got $n"
close=$(echo "$own" | awk '!/^#/ {g = $6; r = $9; d = r / g - 1; if (d < 0) d = -d; if (d < 0.02) c++} END {print c + 0}')
[ "$close" -ge 45 ] || fail "only $close of 49 replanned within 2% of the grid's own predictions:
$own"
echo "$own" | grep -q '^# replanned (--flops 201.55, --reread-bw 306.05): [0-9]* of 49' ||
  fail "no summary line: $own"
other=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$grid" --parallm "$1" --flops 400)
echo "$other" | grep -q '^# replanned (--flops 400, --reread-bw 306.05)' || fail "--flops not taken: $other"
# Twice the FLOP rate: every batch-8 point predicted faster than with the grid's own.
paste <(echo "$own" | awk '!/^#/ && $3 == 8 {print $9}') <(echo "$other" | awk '!/^#/ && $3 == 8 {print $9}') |
  awk '$2 >= $1 {bad++} END {exit bad > 0}' || fail "--flops 400 did not speed up the batch-8 points"
echo "grid_replan: $close of 49 points as the grid predicted them; --flops moves them"
