#!/usr/bin/env bash
# scripts/cluster/grid_summary.py sums up a grid's points (a recorded grid's points.tsv, the
# 2026-12-01 16:50 UTC run): the planner's decode error over every point (TP=2 x PP=2's among
# them), with the count within 10%; its ranking of the layouts; the measured crossovers. The
# errors are recomputed here with awk. Usage: grid_summary_check.sh (no arguments; needs /usr/bin/python3).
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
points=$src/tests/fixtures/cluster-grid-points.tsv
rates=$src/tests/fixtures/cluster-grid-rates.txt
summary() {
  /usr/bin/python3 "$src/scripts/cluster/grid_summary.py" "$points" "$rates" /nonexistent \
    /nonexistent /nonexistent 30 20 32 0 0 80 bf16
}
fail() { echo "grid_summary_check: $*" >&2; exit 1; }
# "mean max n within" of |predicted / measured - 1| over the decode points matching LAYOUT_RE.
errors() {
  awk -F'\t' -v re="$1" '$3 ~ /^[0-9]+$/ && $1 ~ re {e = $5 / $4 - 1; e = e < 0 ? -e : e;
    s += e; n++; if (e > m) m = e; w += (e <= 0.1)}
    END {printf "mean |error| %.1f%%, max %.1f%% over %d points, %d within 10%%", 100 * s / n, 100 * m, n, w}' "$points"
}
out2=$(summary)
want_all="# planner error, decode: $(errors .)"
grep -qxF "$want_all" <<<"$out2" || fail "no '$want_all' in: $out2"
# 41 decode points, 8 of them TP=2 x PP=2; 16 link/batch pairs ranked.
grep -q "over 41 points" <<<"$want_all" || fail "fixture: $want_all"
grep -qE '^# planner ranking: fastest layout named right at [0-9]+ of 16 ' <<<"$out2" || fail "ranking: $out2"
grep -qxF "crossover batch 1: measured 99.3 Mbit/s" <<<"$out2" || fail "crossover batch 1: $out2"
grep -qxF "crossover batch 8: measured 1424.4 Mbit/s" <<<"$out2" || fail "crossover batch 8: $out2"
echo "grid_summary.py: $want_all"
