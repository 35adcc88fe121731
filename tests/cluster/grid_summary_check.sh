#!/usr/bin/env bash
# scripts/cluster/grid_summary.py sums up a grid's points (a recorded grid's points.tsv, the
# 2026-12-01 16:50 UTC run): the planner's decode error over every point (TP=2 x PP=2's among
# them), with the count within 10%; its ranking of the layouts; the measured crossovers. The
# errors are recomputed here with awk. Usage: grid_summary_check.sh (no arguments; needs /usr/bin/python3).
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
points=$src/tests/fixtures/cluster-grid-points.tsv
rates=$src/tests/fixtures/cluster-grid-rates.txt
summary() {  # [POINTS]
  /usr/bin/python3 "$src/scripts/cluster/grid_summary.py" "${1:-$points}" "$rates" /nonexistent \
    /nonexistent /nonexistent 30 20 32 0 0 80 bf16
}
fail() { echo "grid_summary_check: $*" >&2; exit 1; }
# "mean max n within" of |predicted / measured - 1| over the decode points matching LAYOUT_RE,
# the measured and predicted ms in columns MEAS and PRED (4 and 5) of POINTS.
errors() {  # LAYOUT_RE [MEAS PRED POINTS]
  awk -F'\t' -v re="$1" -v mc="${2:-4}" -v pc="${3:-5}" '$3 ~ /^[0-9]+$/ && $1 ~ re {e = $pc / $mc - 1;
    e = e < 0 ? -e : e; s += e; n++; if (e > m) m = e; w += (e <= 0.1)}
    END {printf "mean |error| %.1f%%, max %.1f%% over %d points, %d within 10%%", 100 * s / n, 100 * m, n, w}' "${4:-$points}"
}
# The fixture's points with the columns grid.sh writes today, set by the awk program EDIT, in $edited.
edited=$(mktemp)
trap 'rm -f "$edited"' EXIT
edit() { awk -F'\t' -v OFS='\t' "$1" "$points" >"$edited"; }
out2=$(summary)
want_all="# planner error, decode: $(errors .)"
grep -qxF "$want_all" <<<"$out2" || fail "no '$want_all' in: $out2"
# 41 decode points, 8 of them TP=2 x PP=2; 16 link/batch pairs ranked.
grep -q "over 41 points" <<<"$want_all" || fail "fixture: $want_all"
grep -qE '^# planner ranking: fastest layout named right at [0-9]+ of 16 ' <<<"$out2" || fail "ranking: $out2"
grep -qxF "crossover batch 1: measured 99.3 Mbit/s" <<<"$out2" || fail "crossover batch 1: $out2"
grep -qxF "crossover batch 8: measured 1424.4 Mbit/s" <<<"$out2" || fail "crossover batch 8: $out2"
# With each point's runs spread (a 9th column, as grid.sh writes now), the ranking by pairs of
# layouts: every pair of layouts measured at a link and batch (DP=2's "any" joining each link at
# its batch), counted here with awk; a spread of 0 leaves no misordered pair "closer than their
# runs spread", a spread of 100 (x101) leaves every one so.
pairs=$(awk -F'\t' '$3 ~ /^[0-9]+$/ {n[$2 " " $3]++; if ($2 == "any") any[$3]++}
  END {for (k in n) {split(k, f, " "); if (f[1] == "any") continue; c = n[k] + any[f[2]];
    t += c * (c - 1) / 2} print t}' "$points")
with_spread() { edit '{print $0 "\t'"$1"'"}' && summary "$edited"; }
grep -q "by pairs" <<<"$out2" && fail "a by-pairs line without the spread column: $out2"
line0=$(with_spread 0 | grep "^# planner ranking by pairs")
re="^# planner ranking by pairs of layouts: ([0-9]+) of $pairs ordered as measured; of the ([0-9]+) others, ([0-9]+) measured"
[[ $line0 =~ $re ]] || fail "by pairs (spread 0, $pairs pairs): $line0"
right=${BASH_REMATCH[1]} others=${BASH_REMATCH[2]}
[ $((right + others)) = "$pairs" ] && [ "${BASH_REMATCH[3]}" = 0 ] && [ "$others" -gt 0 ] ||
  fail "by pairs (spread 0): $line0"
line100=$(with_spread 100 | grep "^# planner ranking by pairs")
grep -qF "$right of $pairs ordered as measured; of the $others others, $others measured" <<<"$line100" ||
  fail "by pairs (spread 100): $line100"
# With the point's FLOP rate and the prediction at the start's (columns 10 and 11, as grid.sh
# writes since 2026-12-03 19:27): a second decode error line over those, recomputed here.
edit '$3 ~ /^[0-9]+$/ {$9 = 0.05; $10 = 300; $11 = $5 * 1.3} {print}'
want_start="# planner error, decode at the start's FLOP rate: $(errors . 4 11 "$edited")"
out3=$(summary "$edited")
grep -qxF "$want_start" <<<"$out3" || fail "no '$want_start' in: $out3"
grep -qxF "$want_all" <<<"$out3" || fail "the decode error moved with column 11: $out3"
grep -q "start's FLOP rate" <<<"$out2" && fail "a start's-rate line without column 11: $out2"
# With the other statistic's measured and predicted (columns 12-14, grid.sh --stat): a third
# decode error line over those, named for the statistic, recomputed here; the first unmoved.
edit '$3 ~ /^[0-9]+$/ {$9 = 0.05; $10 = 300; $11 = $5; $12 = "median"; $13 = $4 * 1.1;
  $14 = $5 * (NR % 3 ? 1.02 : 1.4)} {print}'
want_other="# planner error, decode, the median of the runs and the one-rank runs beside them: $(errors . 13 14 "$edited")"
out4=$(summary "$edited")
grep -qxF "$want_other" <<<"$out4" || fail "no '$want_other' in: $out4"
grep -qxF "$want_all" <<<"$out4" || fail "the decode error moved with columns 12-14: $out4"
grep -q "the median of the runs" <<<"$out3" && fail "an other-statistic line without columns 12-14: $out3"
# The crossovers' range within the points' runs spread (column 9): none without it; with a
# spread of 0 the measured crossover at both ends; with 5% one end below it and one above; with
# --stat median (column 12 "fastest") the ends from the fastest runs (column 13), not the line's.
grep -q "runs spread allows" <<<"$out2" && fail "a crossover range without the spread column: $out2"
out6=$(with_spread 0)  # (not piped into grep -q: its early exit would fail the pipe)
grep -qxF "crossover batch 1: measured 99.3 Mbit/s (the points' runs spread allows 99.3 to 99.3 Mbit/s)" <<<"$out6" ||
  fail "crossover range (spread 0): $out6"
range=$(with_spread 0.05 | grep "^crossover batch 1")
[[ $range =~ measured\ 99.3\ Mbit/s\ \(the\ points\'\ runs\ spread\ allows\ ([0-9.]+)\ to\ ([0-9.]+)\ Mbit/s\)$ ]] &&
  awk -v lo="${BASH_REMATCH[1]}" -v hi="${BASH_REMATCH[2]}" 'BEGIN {exit !(lo < 99.3 && hi > 99.3)}' ||
  fail "crossover range (spread 5%): $range"
edit '$3 ~ /^[0-9]+$/ {$9 = 0; $10 = 300; $11 = $5; $12 = "fastest"; $13 = $4; $14 = $5;
  if ($1 == "tp2") $4 = $4 * 1.2} {print}'
out5=$(summary "$edited")
grep -qE "^crossover batch 1: measured [0-9.]+ Mbit/s \(the points' runs spread allows 99.3 to 99.3 Mbit/s\)$" <<<"$out5" &&
  ! grep -q "measured 99.3 Mbit/s" <<<"$out5" || fail "crossover range from the fastest runs (--stat median): $out5"
echo "grid_summary.py: $want_all; $line0; $range"
