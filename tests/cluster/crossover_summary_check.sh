#!/usr/bin/env bash
# scripts/cluster/crossover_summary.py (grid --crossover's summary) on rates written here: the
# measured crossover where the pairs' median log(TP/PP) goes through 0 (log-linear between the two
# rates that bracket it), the range the pairs decide (80% of a rate's pairs one way), the planner's
# crossover from the pooled file and from each rate's own column, and the bounds when the rates
# never cross. Usage: crossover_summary_check.sh (no arguments; needs /usr/bin/python3).
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
sum=$src/scripts/cluster/crossover_summary.py
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
expect() {  # WHAT EXPECTED-SUBSTRING (of $out)
  echo "$out" | grep -qF -- "$2" || fail "$1: wanted '$2' in: $out"
}
# MBIT MEDIAN_LOG_RATIO TP_FASTER PAIRS PRED_LOG_RATIO NODE ALONE GFLOPS, in the search's order.
cat >"$tmp/xo" <<'X'
1000 0.077 0 8 0.047 70 35 250
5000 -0.114 8 8 -0.215 70 35 250
2236 -0.163 7 8 -0.3 70 35 250
1495 -0.039 5 8 0.2 70 35 250
X
printf '1000 17 16\n5000 13 16\n2236 14 16\n1495 15.5 16\n' >"$tmp/pooled"
out=$(/usr/bin/python3 "$sum" "$tmp/xo" 8 "$tmp/pooled")
echo "$out"
# Between 1495 (-0.039) and 1000 (+0.077): 1495 x (1000/1495)^(0.039/0.116) = 1306.
expect "measured" "crossover batch 8 (paired search over 4 rates): measured 1306 Mbit/s"
# PP won all 8 at 1000; TP 7 of 8 at 2236 (>= 80%), 5 of 8 at 1495 (undecided).
expect "decided range" "(the pairs decide 1000 to 2236 Mbit/s)"
# Pooled: log(15.5/16) at 1495, log(17/16) at 1000: 1302. Each rate's own: first crossing from the
# top, between 2236 (-0.3) and 1495 (+0.2): 2236 x (1495/2236)^0.6 = 1756.
expect "pooled" "predicted 1302 Mbit/s, measured/predicted 1.00x"
expect "own" "predicted with each rate's own compute rates 1756 Mbit/s (0.74x)"

# Never crossing: PP faster everywhere (measured), TP faster everywhere (pooled); no rate decided.
printf '100 0.2 1 2 0.1 1 1 1\n400 0.1 1 2 0.1 1 1 1\n' >"$tmp/xo"
printf '100 1 2\n400 1 2\n' >"$tmp/pooled"
out=$(/usr/bin/python3 "$sum" "$tmp/xo" 1 "$tmp/pooled")
expect "PP everywhere" "measured PP=2 faster at every rate searched (>= 400 Mbit/s)"
expect "TP everywhere" "predicted TP=2 faster at every rate searched (down to 100 Mbit/s)"
expect "undecided" "(the pairs decide no rate: none had 80% of its pairs one way)"
echo "$out" | grep -q "measured/predicted" && fail "a ratio printed without two crossovers: $out"

: >"$tmp/empty"
if /usr/bin/python3 "$sum" "$tmp/empty" 8 "$tmp/pooled" 2>"$tmp/err"; then fail "no rates accepted"; fi
grep -q "empty: no rates measured" "$tmp/err" || fail "no clear message: $(cat "$tmp/err")"
echo "crossover summary check passed"
