# shellcheck shell=bash
# Sourced by scripts/cluster/grid.sh for `grid --crossover BATCH`: the link bandwidth below which
# PP=2 beats TP=2 for decode (one rank a node), found by bisection on the link's rate instead of
# read off the grid's presets. At each rate the two layouts run in --pairs alternating pairs (TP
# first, then PP first, ...), so the host's minute-to-minute drift falls on both alike: a pair's
# log(TP ms / PP ms) is the measurement, its median over the pairs says which layout is faster,
# and how many of the pairs agree says how sure that is. Between the pairs, the one-rank runs that
# give the planner its rates (as the grid's points take them), and at each rate a bench comm
# calibration of the link, so the planner predicts the two layouts at the same rates.
# Uses cmd_grid's functions (decode_run, step_ms, decode1, rates, calibrate, plan_decode, median)
# and its $work and $comm.
# shellcheck disable=SC2154  # work, comm (cmd_grid's) and here (emulate-cluster.sh's)

# One rate: prints its line and appends "MBIT MEDIAN_LOG_RATIO TP_FASTER PAIRS PRED_LOG_RATIO
# NODE_GBPS ALONE_GBPS GFLOPS" (the planner's, from the one-rank runs beside the pairs) to $work/xo.
xo_rate() {  # BATCH MBIT PAIRS
  local b=$1 r=$2 pairs=$3 k l name=x$2M o ms
  cmd_shape "$r" >/dev/null
  calibrate "$name" node
  local tp=$work/xo.$name.tp pp=$work/xo.$name.pp alone=$work/xo.$name.alone
  local alone4=$work/xo.$name.alone4 node=$work/xo.$name.node
  : >"$tp"; : >"$pp"; : >"$alone"; : >"$alone4"; : >"$node"
  for ((k = 0; k < pairs; k++)); do
    decode1 1 >>"$alone"
    decode1 4 >>"$alone4"
    { decode1 1 >"$work/bw0" & decode1 1 >"$work/bw1"; wait; }
    cat "$work/bw0" "$work/bw1" | paste -sd' ' >>"$node"
    for l in $( ((k % 2 == 0)) && echo tp pp || echo pp tp); do
      o=$(decode_run 2 node "$b" 1 "--$l" 2) || die "bench decode --$l 2 at $r Mbit/s failed: $(echo "$o" | tail -3)"
      ms=$(echo "$o" | step_ms)
      echo "$ms" >>"$work/xo.$name.$l"
    done
  done
  local pn pa pf ptp ppp
  read -r _ _ _ _ pn pa pf _ < <(rates "$node" "$alone" "$alone4")
  ptp=$(plan_decode "$comm/$name.json" 2 1 1 "$b" "$pn" "$pa" "$pf")
  ppp=$(plan_decode "$comm/$name.json" 1 2 1 "$b" "$pn" "$pa" "$pf")
  paste "$tp" "$pp" | /usr/bin/python3 -c '
import math, sys
r, ptp, ppp, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
pairs = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
med = lambda v: sorted(v)[len(v) // 2] if len(v) % 2 else sum(sorted(v)[len(v) // 2 - 1:len(v) // 2 + 1]) / 2
d = [math.log(t / p) for t, p in pairs]
faster = sum(t < p for t, p in pairs)
dp = math.log(ptp / ppp)
print("%8s %9.2f %9.2f %3d of %-3d %+7.1f%%   %9.3f %9.3f %+7.1f%%" % (
    r, med([t for t, _ in pairs]), med([p for _, p in pairs]), faster, len(pairs),
    100 * (math.exp(med(d)) - 1), ptp, ppp, 100 * (math.exp(dp) - 1)))
open(out, "a").write("%s %.6f %d %d %.6f %s\n" % (r, med(d), faster, len(pairs), dp, " ".join(sys.argv[5:])))
' "$r" "$ptp" "$ppp" "$work/xo" "$pn" "$pa" "$pf"
}

# The search: both ends first (at LO PP=2 should be the faster, at HI TP=2), then STEPS bisections
# at the geometric middle, and the summary (cluster/crossover_summary.py).
xo_search() {  # BATCH LO HI PAIRS STEPS
  local b=$1 lo=$2 hi=$3 pairs=$4 steps=$5 s mid
  echo "# crossover search, batch $b: TP=2 against PP=2, one rank a node, $pairs alternating pairs a rate; $lo and $hi Mbit/s, then $steps bisections"
  echo "# mbit/s    TP ms     PP ms   TP faster  TP/PP-1  | predicted TP ms  PP ms  TP/PP-1   (medians of the pairs)"
  : >"$work/xo"
  xo_rate "$b" "$lo" "$pairs"
  xo_rate "$b" "$hi" "$pairs"
  local d_lo d_hi
  d_lo=$(awk -v r="$lo" '$1 == r {print $2}' "$work/xo")
  d_hi=$(awk -v r="$hi" '$1 == r {print $2}' "$work/xo")
  if awk -v a="$d_lo" -v b="$d_hi" 'BEGIN { exit !(a > 0 && b < 0) }'; then
    for ((s = 0; s < steps; s++)); do
      mid=$(awk -v a="$lo" -v b="$hi" 'BEGIN { printf "%.0f", sqrt(a * b) }')
      if [ "$mid" = "$lo" ] || [ "$mid" = "$hi" ]; then break; fi  # the bracket is 1 Mbit/s wide
      xo_rate "$b" "$mid" "$pairs"
      if awk -v r="$mid" '$1 == r {exit !($2 > 0)}' "$work/xo"; then lo=$mid; else hi=$mid; fi
    done
  else
    echo "# not bracketed: PP=2 is not the faster at $lo Mbit/s or TP=2 not at $hi (give other --lo/--hi)"
  fi
  # The planner once more at every rate with one set of compute rates, the medians of the rates'
  # (the compute does not change with the link; each rate's own moved with the host's minute), so
  # that its crossover follows the links' calibrations alone.
  local r pn pa pf
  pn=$(median <(cut -d' ' -f6 "$work/xo")) pa=$(median <(cut -d' ' -f7 "$work/xo"))
  pf=$(median <(cut -d' ' -f8 "$work/xo"))
  echo "# planner at every rate with the rates' median compute: node/rank $pn/$pa GB/s, $pf GFLOP/s"
  while read -r r _; do
    echo "$r $(plan_decode "$comm/x${r}M.json" 2 1 1 "$b" "$pn" "$pa" "$pf") $(plan_decode "$comm/x${r}M.json" 1 2 1 "$b" "$pn" "$pa" "$pf")"
  done <"$work/xo" >"$work/xo.pooled"
  /usr/bin/python3 "$here/cluster/crossover_summary.py" "$work/xo" "$b" "$work/xo.pooled"
}
