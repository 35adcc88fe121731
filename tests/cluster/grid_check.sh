#!/usr/bin/env bash
# `scripts/emulate-cluster.sh grid` end to end at its smallest: the tiny model, one link preset
# (eth) and no sweep, 2 runs a point, 4 timed tokens, --stat median (about 2 minutes on 2 cores);
# then grid --crossover at its smallest (half a minute).
# What it holds, not the planner's accuracy on a model whose steps are tens of microseconds:
# - every point of the grid is there once (13 decode, 4 prefill, 2 training), each line's error
#   is its predicted over its measured time, and the line's statistic is the median with the
#   fastest run beside it (of 2 runs the median is the slower: the fastest is no slower, and the
#   runs' spread is the one over the other);
# - the summary counts those points, names the other statistic, and gives both crossovers;
# - grid_replan.py, from the printed lines alone (the model's heads and FFN, each link's fit, each
#   point's rates, the cores), predicts every point again as the grid did;
# - grid_svg.py draws it; the cluster is gone afterwards;
# - grid --crossover (the same model, 2 pairs a rate) searches its two ends and sums them up.
# Exit 77 (skip) without root, network namespaces or mpirun. Usage: grid_check.sh PARALLM
set -euo pipefail
bin=$1
# shellcheck source=tests/cluster/cluster_env.sh
source "$(dirname "$0")/cluster_env.sh"
fail() { echo "FAIL: $*"; exit 1; }
ag=/proc/sys/kernel/sched_autogroup_enabled ag_before=""
[ -r "$ag" ] && ag_before=$(cat "$ag")

"$bin" init-model --shape tiny --seed 1 --out "$tmp/tiny" >/dev/null
out=$tmp/grid.txt
"$S" grid --model "$tmp/tiny" --presets eth --sweep "" --reps 2 --tokens 4 --prompt-len 32 \
  --stat median >"$out" 2>"$tmp/grid.err" || { tail -20 "$out" "$tmp/grid.err"; fail "grid failed"; }
cat "$out"
[ -z "$(leftovers)" ] || { leftovers; fail "the grid left its cluster behind"; }
[ -z "$ag_before" ] || [ "$(cat "$ag")" = "$ag_before" ] ||
  fail "autogroups $(cat "$ag") after the grid, $ag_before before"

grep -qF "12 heads, 6 KV heads, FFN 200), 4 timed tokens, median of 2 runs a point" "$out" ||
  fail "no '# grid:' line naming the model's shape and the statistic"
# Every point once: layout, link, batch.
want="dp2 any 8
dp2-train eth t8
dp2-train shm t8
pp2 eth 1
pp2 eth 8
pp2 eth p32
pp2 shm 1
pp2 shm 8
pp2 shm p32
tp2 eth 1
tp2 eth 8
tp2 eth p32
tp2 shm 1
tp2 shm 8
tp2 shm p32
tp2pp2-tpin eth 1
tp2pp2-tpin eth 8
tp2pp2-tpx eth 1
tp2pp2-tpx eth 8"
got=$(grep -v '^#' "$out" | grep -v '^crossover' | awk '{print $1, $2, $3}' | LC_ALL=C sort)
[ "$got" = "$want" ] || fail "the grid's points:
$got
expected:
$want"
# Each point: times above 0, its error its predicted over measured; a decode point's statistic the
# median of its 2 runs (the slower), with the fastest beside it.
grep -v '^#' "$out" | grep -v '^crossover' | awk '
  function bad(why) { print "FAIL: " why ": " $0; n++ }
  { if (!($4 > 0 && $5 > 0)) bad("a time not above 0")
    if ($6 != sprintf("%+.1f", ($5 / $4 - 1) * 100)) bad("error " $6 " is not predicted over measured")
    if ($3 !~ /^[18]$/) next
    decode++
    if (!match($0, /\| fastest [0-9.]+ [0-9.]+ [-+][0-9.]+%$/)) { bad("no fastest run at its end"); next }
    split(substr($0, RSTART, RLENGTH), f, " ")
    if (f[3] > $4) bad("its fastest run " f[3] " above its median")
    if (f[5] != sprintf("%+.1f%%", (f[4] / f[3] - 1) * 100)) bad("the fastest run'"'"'s error " f[5])
    if (!match($0, /runs \+[0-9.]+%/)) { bad("no runs spread"); next }
    spread = substr($0, RSTART + 6, RLENGTH - 7)
    if (spread != sprintf("%.1f", 100 * sprintf("%.3f", $4 / f[3] - 1))) bad("runs spread " spread)
  }
  END { if (decode != 13) { print "FAIL: " decode " decode points"; n++ }; exit n > 0 }' ||
  fail "the points' lines"
# (as grid_summary.py counts them: |predicted / measured - 1| <= 0.1, of the times printed)
within=$(grep -v '^#' "$out" | awk '$3 ~ /^[18]$/ {e = $5 / $4 - 1; if (e < 0) e = -e; if (e <= 0.1) n++} END {print n + 0}')
grep -qE "^# planner error, decode: mean \|error\| [0-9.]+%, max [0-9.]+% over 13 points, $within within 10%" "$out" ||
  fail "the summary's decode line does not count the 13 points ($within within 10%)"
for s in "decode, the fastest of the runs and the one-rank runs beside them: .* over 13 points" \
  "prefill: .* over 4 points" "training step: .* over 2 points"; do
  grep -qE "^# planner error, $s" "$out" || fail "no summary line '$s'"
done
for b in 1 8; do
  grep -qE "^crossover batch $b: measured .*Mbit/s.*, predicted .*Mbit/s" "$out" ||
    fail "no crossover at batch $b"
done

# The printed lines suffice to plan every decode point again as the grid did.
replan=$(/usr/bin/python3 "$src/scripts/cluster/grid_replan.py" "$out" --parallm "$bin")
echo "$replan"
# Within 1%, or one unit of the 3 decimals both print (the tiny model's steps are 0.03-1 ms).
echo "$replan" | awk '!/^#/ {n++; d = $9 - $6; if (d < 0) d = -d; if (d > 0.01 * $6 + 0.0015) {print "FAIL: replanned " $9 " against " $6 ": " $0; bad++}}
  END {exit bad > 0 || n != 13}' || fail "grid_replan.py did not give back the grid's 13 predictions"

/usr/bin/python3 "$src/scripts/cluster/grid_svg.py" "$out" >"$tmp/grid.svg"
dots=$(grep -c '<circle' "$tmp/grid.svg")
[ "$dots" = 24 ] || fail "grid_svg.py drew $dots dots and rings, not 24 (12 decode points, measured and predicted)"

# grid --crossover at its smallest: both ends (20 and 2000 Mbit/s), then one bisection if they
# bracket a crossover (the tiny model's PP=2 is the faster at both here: TP=2's 7 all-reduces a
# token against one hop), each rate's pairs and the planner's prediction, the summary over them.
xo=$tmp/xo.txt
"$S" grid --model "$tmp/tiny" --crossover 8 --pairs 2 --steps 1 --reps 1 --tokens 4 --prompt-len 32 \
  --lo 20 --hi 2000 >"$xo" 2>"$tmp/xo.err" || { tail -20 "$xo" "$tmp/xo.err"; fail "grid --crossover failed"; }
cat "$xo"
[ -z "$(leftovers)" ] || { leftovers; fail "grid --crossover left its cluster behind"; }
rates=$(grep -E '^ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-2] of 2 ' "$xo" | awk '{print $1}' | paste -sd' ')
case "$rates" in
  "20 2000") grep -q "^# not bracketed" "$xo" || fail "2 rates searched but no 'not bracketed' line" ;;
  "20 2000 200") ;;
  *) fail "grid --crossover searched '$rates' Mbit/s, not 20 and 2000 (then 200)" ;;
esac
n=$(echo "$rates" | wc -w)
grep -qE "^crossover batch 8 \(paired search over $n rates\): measured .*Mbit/s.* predicted .*Mbit/s" "$xo" ||
  fail "no crossover summary over the $n rates"
echo "grid check passed: 19 points, $within of 13 decode within 10%, replanned as printed, drawn; --crossover searched $rates Mbit/s"
