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
# Several grids: each one's crossovers at its rates, measured as the grid's own summary read them
# (crossing.py, shared with grid_summary.py), then pooled: with two grids each median is the
# geometric mean of the two, and two crossovers 1.36x apart are not within 1.25x of each other.
a=$src/tests/fixtures/cluster-grid-pp-split.txt
two=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$a" "$fx" --parallm "$PARALLM")
for g in "$a" "$fx"; do
  echo "$two" | grep -qxF "# grid $g" || fail "no '# grid $g' header: $two"
  for b in 1 8; do
    want=$(sed -n "s/^crossover batch $b: measured \([0-9.]*\) Mbit\/s.*/\1/p" "$g")
    sec=$(echo "$two" | awk -v h="# grid $g" '$0 == h {on = 1; next} /^# (grid [^(]|pooled)/ {on = 0} on')
    grep -qF "# crossover batch $b at the grid's rates: measured $want Mbit/s," <<<"$sec" ||
      fail "$g batch $b: the measured crossover is not the grid's own $want Mbit/s: $two"
  done
done
pooled() {  # OUTPUT BATCH WHAT(measured|replanned) -> the pooled median
  echo "$1" | sed -n "s/^# pooled over [0-9]* grids, crossover batch $2: .*$3 median \([0-9]*\) Mbit.*/\1/p"
}
for b in 1 8; do
  for what in measured replanned; do
    col=$([ $what = measured ] && echo 10 || echo 17)
    geo=$(echo "$two" | awk -v b="$b" -v c="$col" '$1 == "#" && $2 == "crossover" && $4 == b {p = p == "" ? $c : p * $c} END {printf "%.0f", sqrt(p)}')
    got=$(pooled "$two" "$b" "$what")
    [ -n "$got" ] || fail "batch $b: no pooled $what median: $two"
    awk -v g="$got" -v w="$geo" 'BEGIN {exit !(g - w <= 1 && w - g <= 1)}' ||
      fail "batch $b: pooled $what median '$got', the two grids' geometric mean $geo: $two"
  done
done
echo "$two" | grep -qF "crossover batch 8: measured median 1641 Mbit/s (1409-1913)" || fail "pooled batch 8: $two"
echo "$two" | grep -q "crossover batch 8: .*within 1.25x of each other: 0 of 1 pairs" || fail "1913 and 1408.5 within 1.25x?"
# One grid twice: every point's median error is its own, so the pooled decode count is the grid's.
twice=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$fx" "$fx" --parallm "$PARALLM")
n=$(echo "$twice" | sed -n 's/^# replanned .*: \([0-9]*\) of 49 decode.*/\1/p' | head -1)
echo "$twice" | grep -qF "# pooled over 2 grids, decode: $n of 49 points' median error within 10%" ||
  fail "one grid twice: the pooled decode count is not the grid's own $n: $twice"
echo "$twice" | grep -q "crossover batch 8: .*measured/replanned 0.85x; .*1 of 1 pairs" || fail "one grid twice: $twice"
# and its ranking by median times is the grid's own (the replanned times within 2% of the grid's).
own=$(sed -n 's/^# planner ranking: fastest layout named right at \([0-9]* of [0-9]*\) link.*/\1/p' "$fx")
pairs=$(sed -n 's/^# planner ranking by pairs of layouts: \([0-9]* of [0-9]*\) ordered.*/\1/p' "$fx")
echo "$twice" | grep -qF "ranking by median times: fastest layout named right at $own link/batch pairs; $pairs pairs of layouts ordered as measured" ||
  fail "one grid twice: the pooled ranking is not the grid's own ($own, $pairs): $twice"
# A grid that saw no second pass prints its re-read rate as 0.00 (grid.sh; the tiny model in
# cluster_grid, now and then): planned without --reread-bw, as the grid planned it.
zero=$(mktemp)
trap 'rm -f "$zero"' EXIT
sed 's/re-read the weights at [0-9.]* GB\/s/re-read the weights at 0.00 GB\/s/' "$fx" >"$zero"
n=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$zero" --parallm "$PARALLM" | grep -vc '^#') ||
  fail "a grid with a re-read rate of 0.00 did not replan"
[ "$n" = 49 ] || fail "a grid with a re-read rate of 0.00: $n points replanned"
echo "grid_replan: $one of 49 points as the grid predicted them, $each of 49 with the points' own FLOP rates; --flops moves them"
