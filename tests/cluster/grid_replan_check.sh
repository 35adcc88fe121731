#!/usr/bin/env bash
# scripts/cluster/grid_replan.py re-predicts recorded grids with `parallm plan`: given a grid's
# own rates it gives back the grid's own predictions (all but a few of the 49 within 2%: the
# planner may have moved a little since, the parsing may not); given other rates it says so in its
# summary and its predictions move. Two grids: 2026-12-03 14:07 UTC (one FLOP rate, the start's)
# and 19:27 UTC (each point planned with its own FLOP rate); --core-sharing moves only the points
# it concerns. Usage: grid_replan_check.sh PARALLM
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
fail() { echo "grid_replan_check: $*" >&2; exit 1; }
# GRID OWN_LABEL REREAD FLOPS: replans GRID as it is (its summary naming OWN_LABEL as the FLOP
# rate) and with --flops FLOPS, a rate above every one the grid used: each batch-8 point faster.
check() {
  local grid=$src/tests/fixtures/$1 own other n close
  own=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$grid" --parallm "$PARALLM")
  n=$(echo "$own" | grep -vc '^#')
  [ "$n" = 49 ] || fail "$1: expected 49 decode points, got $n"
  close=$(echo "$own" | awk '!/^#/ {g = $6; r = $9; d = r / g - 1; if (d < 0) d = -d; if (d < 0.02) c++} END {print c + 0}')
  [ "$close" -ge 45 ] || fail "$1: only $close of 49 replanned within 2% of the grid's own predictions:
$own"
  echo "$own" | grep -qF "# replanned (--flops $2, --reread-bw $3): " || fail "$1: no summary line: $own"
  other=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$grid" --parallm "$PARALLM" --flops "$4")
  echo "$other" | grep -qF "# replanned (--flops $4, --reread-bw $3)" || fail "$1: --flops not taken: $other"
  paste <(echo "$own" | awk '!/^#/ && $3 == 8 {print $9}') <(echo "$other" | awk '!/^#/ && $3 == 8 {print $9}') |
    awk '$2 >= $1 {bad++} END {exit bad > 0}' || fail "$1: --flops $4 did not speed up the batch-8 points"
  echo "$close"
}
PARALLM=$1
one=$(check cluster-grid-pp-split.txt 201.55 306.05 400)
each=$(check cluster-grid-point-flops.txt "each point's own" 68.42 431.03)
# --core-sharing E (a grid from before bench comm --share-probe printed none): the TP=2 x PP=2
# points at batch 8 predicted slower, every other point as before.
fx=$src/tests/fixtures/cluster-grid-point-flops.txt
paste <(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$fx" --parallm "$PARALLM" | grep -v '^#') \
      <(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$fx" --parallm "$PARALLM" --core-sharing 0.8 |
          grep -v '^#' | awk '{print $9}') |
  awk '{moved = $NF > $9 * 1.01; want = $1 ~ /^tp2pp2/ && $3 == 8
        if (moved != want || (!want && $NF != $9)) {print; bad++}; if (want) n++}
       END {exit bad > 0 || n != 8}' || fail "--core-sharing 0.8 did not move exactly the 8 tp2pp2 batch-8 points"
echo "grid_replan: $one of 49 points as the grid predicted them, $each of 49 with the points' own FLOP rates; --flops moves them"
