# shellcheck shell=bash
# Sourced by scripts/emulate-cluster.sh for `grid`: measures decode ms/token of TP=2, PP=2 and
# TP=2 x PP=2 (TP group inside a node, or across nodes) at each link preset and batch 1 and 8,
# DP=2 at batch 8, and a DP=2 training step, on an emulated 2-node cluster, next to what `parallm
# plan` predicts from `bench comm` calibrations taken on the same links; then the planner's
# ranking of the layouts and the crossover bandwidth (below it PP=2 beats TP=2 for decode),
# measured and predicted. Sets the cluster up and tears it down (trap) itself.
#
# Layouts (2 nodes, 2 slots each; world rank = tp + pp * TP, so --map-by slot puts a TP pair on
# one node and --map-by node splits it):
#   tp2      TP=2, one rank a node: every all-reduce crosses the link
#   pp2      PP=2, one stage a node: the activations cross the link
#   tp2pp2-tpin  TP pairs inside a node (shared memory), the stages across the link
#   tp2pp2-tpx   TP pairs across the link, the two stages of a node over shared memory
#   tp2/pp2 at link "shm": both ranks in one node, the in-node reference
#   dp2      DP=2 at batch 8: a replica of batch 4 a node, nothing on the link (link "any")
#   dp2-train  DP=2 training (bench train, batch "t8"), a replica a node, gradients across the link
# The planner gets one calibration per layout: the all-reduce fit of the link its TP group uses,
# and the send/recv fit of the link its stages use (shared memory or the shaped link), plus the
# arrival skew of its TP group: the share of each slice of work that the slower rank adds
# (`arrival_skew`, the median of the bench comm runs' probes on those ranks' places), and
# optionally a fixed wait per all-reduce (`arrival_skew_us`: --skew US gives it; --skew auto
# measures it once on the in-node TP=2 batch-1 point from --comm-stats; the default is 0, none:
# on the loaded 2-core box the in-node ranks, spinning in shared memory, waited 4x longer than
# ranks on TCP, so a fixed in-node wait did not carry over). On fewer than 4 cores TP=2 x PP=2's
# two calibrations also get the core-sharing efficiency of their pinned ranks (shareprobe).

# shellcheck source=scripts/cluster/crossover.sh disable=SC2154  # here: emulate-cluster.sh's
source "$here/cluster/crossover.sh"

cmd_grid() {
  need_root
  local model="" tokens=32 reps=3 passes=1 stat=fastest skew_us=0 presets=$PRESETS sweep=default do_plan=1 plen=128
  local xo_batch="" xo_lo="" xo_hi="" xo_pairs=8 xo_steps=5
  while [ $# -gt 0 ]; do
    case "$1" in
      --model) model=${2:?}; shift 2 ;;
      --tokens) tokens=${2:?}; shift 2 ;;
      --presets) presets=${2:?}; shift 2 ;;
      --sweep) sweep=${2:-}; shift 2 ;;
      --reps) reps=${2:?}; shift 2 ;;
      --passes) passes=${2:?}; shift 2 ;;
      --stat) stat=${2:?}; shift 2 ;;
      --prompt-len) plen=${2:?}; shift 2 ;;
      --skew) skew_us=${2:?}; shift 2 ;;
      --no-plan) do_plan=0; shift ;;
      --crossover) xo_batch=${2:?}; shift 2 ;;
      --lo) xo_lo=${2:?}; shift 2 ;;
      --hi) xo_hi=${2:?}; shift 2 ;;
      --pairs) xo_pairs=${2:?}; shift 2 ;;
      --steps) xo_steps=${2:?}; shift 2 ;;
      *) die "grid: unknown option '$1'" ;;
    esac
  done
  [[ $passes =~ ^[1-9][0-9]*$ ]] || die "grid: --passes must be a whole number of 1 or more, not '$passes'"
  [[ $stat =~ ^(fastest|median)$ ]] || die "grid: --stat must be fastest or median, not '$stat'"
  if [ -n "$xo_batch" ]; then
    [[ $xo_batch =~ ^[1-9][0-9]*$ ]] || die "grid: --crossover must be a batch size of 1 or more, not '$xo_batch'"
    [[ $xo_pairs =~ ^[1-9][0-9]*$ ]] || die "grid: --pairs must be a whole number of 1 or more, not '$xo_pairs'"
    [[ $xo_steps =~ ^[0-9]+$ ]] || die "grid: --steps must be a whole number, not '$xo_steps'"
    local v
    for v in "$xo_lo" "$xo_hi"; do
      [ -z "$v" ] || [[ $v =~ ^[1-9][0-9]*$ ]] || die "grid: --lo and --hi are whole Mbit/s above 0, not '$v'"
    done
    [ -z "$xo_lo" ] || [ -z "$xo_hi" ] || [ "$xo_lo" -lt "$xo_hi" ] ||
      die "grid: --lo ($xo_lo Mbit/s) must be below --hi ($xo_hi)"
  elif [ -n "$xo_lo$xo_hi" ] || [ "$xo_pairs/$xo_steps" != 8/5 ]; then
    die "grid: --lo, --hi, --pairs and --steps go with --crossover BATCH"
  fi
  [ -x "$PARALLM" ] || die "no parallm binary at $PARALLM (set PARALLM=...)"
  local work retries=0
  work=$(mktemp -d /tmp/plm-grid.XXXXXX)
  # shellcheck disable=SC2064
  trap "cmd_down; rm -rf '$work'" EXIT
  trap 'exit 130' INT TERM
  if [ -z "$model" ]; then
    # Four layers of TinyLlama-1.1B's shape (bf16, 2048-token vocabulary): 352 MB of weights,
    # ten times the L3, so that decode streams them from memory as a real model's does, and a
    # step (~11 ms on one rank) that per-message latencies do not rule.
    model=$work/model
    # shellcheck disable=SC2154  # root: set by emulate-cluster.sh, which sources this file
    "$PARALLM" init-model --shape "$root/bench/configs/tinyllama-vocab2048.json" --layers 4 \
      --seed 1 --out "$model" >/dev/null
  fi
  local dtype row_bytes
  row_bytes=$(/usr/bin/python3 -c 'import json,sys; print(4 * json.load(open(sys.argv[1]+"/config.json"))["hidden_size"])' "$model")
  dtype=$(/usr/bin/python3 -c 'import json,sys; d=json.load(open(sys.argv[1]+"/config.json")).get("torch_dtype","float32"); print({"bfloat16":"bf16","float16":"fp16"}.get(d,"fp32"))' "$model")
  echo "# grid: model $model ($(/usr/bin/python3 -c 'import json,sys; c=json.load(open(sys.argv[1]+"/config.json")); print("hidden %d, %d layers, vocab %d, %s, %d heads, %d KV heads, FFN %d" % (c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c.get("torch_dtype"), c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"]))' "$model")), $tokens timed tokens, $stat of $reps runs a point$([ "$passes" = 1 ] || echo " in each of $passes passes over the grid"), arrival skew $skew_us"
  echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u +%FT%TZ)"

  # What the planner needs of the compute, measured on one-thread ranks as the grid's are. A CPU
  # rank's decode step is its bytes plus its FLOPs (the planner sums them on a CPU), and its GEMV
  # takes the tokens 4 at a time, passing over the weights again, from the caches, for each further
  # 4 (kernels/matmul.h). One rank alone at batch 1 to 8, in rounds of the eight back to back, and
  # in each round a line fitted to batch 1-4 (least squares) and the steps of batch 5-8 above it:
  # its slope, the time one more sequence adds, gives the FLOP rate (plan --flops: the GFLOPs a
  # sequence adds over the time it adds), its step what the second pass adds (plan --reread-bw:
  # the step's bytes over that time), each the median over the rounds (the machine's rate moves
  # from minute to minute: from the fastest of 3 runs at batch 1, 4 and 8 two grids got 267
  # GFLOP/s and 87 GB/s, 496 and 30); and, with the FLOPs of its one sequence taken out, the rate
  # batch 1 streams the weights alone (--rank-mem-bw); two ranks at batch 1 at once, summed, what
  # the node streams (--mem-bw: ranks on one machine share its memory). The rates: the best of
  # the runs (others' load only lowers them). At least 5 rounds.
  # --bandwidth as in the grid's own runs: without it bench decode also reads a buffer of its own
  # between steps to measure the memory, which the measured runs do not.
  decode1() {  # BATCH -> "ms_per_step achieved_GBps gflops_per_s"
    "$PARALLM" bench decode --model "$model" --tokens "$tokens" --threads 1 --warmup 3 --batch "$1" \
      --bandwidth 5 |
      awk '/^  ms\/(token|step)/ {ms = $NF} /^  achieved/ {bw = $2}
           /^  GFLOP\/s \(linear\)/ {fl = $3} END {print ms + 0, bw + 0, fl + 0}'
  }
  local rep
  local b
  for ((rep = 0; rep < (reps > 5 ? reps : 5); rep++)); do
    for b in 1 2 3 4 5 6 7 8; do decode1 "$b" >>"$work/alone$b"; done
    { decode1 1 >"$work/bw0" & decode1 1 >"$work/bw1"; wait; }
    cat "$work/bw0" "$work/bw1" | paste -sd' ' >>"$work/node"
  done
  # Prints "node alone flops reread" (GB/s, GB/s, GFLOP/s, GB/s; reread 0: no second pass seen)
  # from the runs in $work, the node's from NODEFILE; with ALONE4FILE (a point's batch-4 runs)
  # the four again with the point's own time a sequence adds (see measure). The point's runs
  # (NODEFILE, ALONEFILE, ALONE4FILE) taken at their fastest, or with STAT median at their median.
  rates() {  # NODEFILE [ALONEFILE [ALONE4FILE [STAT]]]
    /usr/bin/python3 - "$work" "$1" "${2:-$work/alone1}" "${3:-}" "${4:-fastest}" <<'PY'
import sys
w = sys.argv[1]
rows = lambda f: [list(map(float, l.split())) for l in open(f if "/" in f else f"{w}/{f}") if l.strip()]
med = lambda v: sorted(v)[len(v) // 2]
pick = med if sys.argv[5] == "median" else min  # of the point's runs
def fit(steps):  # ms at batch 1..8 -> (ms a sequence, ms of the second pass)
    # The slope from batch 1-4 alone (least squares), the first pass, which is what a pipeline's
    # micro-batches of 4 run; the second pass the mean of batch 5-8 above that line. (One slope
    # through both passes, the later sequences costing more than the first four, put batch 4 0.8 ms
    # high: 2026-12-03 14:07, slope 1.76 ms a sequence against 1.46 from batch 1-4, and PP=2's
    # micro-batches of 4 predicted 15-20% slow.)
    lo, hi = steps[:4], steps[4:]
    mean = lambda v: sum(v) / len(v)
    slope = sum((b - 2.5) * (t - mean(lo)) for b, t in zip((1, 2, 3, 4), lo)) / 5.0
    line = lambda b: mean(lo) + (b - 2.5) * slope
    return slope, mean([t - line(b) for b, t in zip((5, 6, 7, 8), hi)])
rounds = [fit([r[0] for r in rnd]) for rnd in zip(*(rows(f"alone{b}") for b in range(1, 9)))]
per_seq_ms = med([c for c, _ in rounds])      # one more sequence within a pass
second_ms = med([j for _, j in rounds])       # the second pass, beyond its sequences
t1, bw1, _ = min(rows("alone1"))             # fastest batch-1 run: ms, GB/s
t8, _, g8 = min(rows("alone8"))              # fastest batch-8 run: ms, GFLOP/s of its linear layers
# GB/s of the second pass: the batch-1 step's bytes (GB/s x ms) over its time; none when noise
# hides it (under 2% of a batch-1 step).
reread = bw1 * t1 / second_ms if second_ms > 0.02 * t1 else 0.0
t1, bw1, _ = pick(rows(sys.argv[3]))         # the one-rank run asked for (the start's, or a point's)
def out(per_seq_ms):
    # GFLOP/s: a sequence's GFLOPs (g8 x t8 / 1000 / 8) over the seconds it adds (per_seq_ms /
    # 1000); a slope of 0 or less (noise) leaves the plain batch-8 rate.
    flops = g8 * t8 / 8 / per_seq_ms if per_seq_ms > 0 else g8
    stream = lambda t, bw: bw * t / max(t - per_seq_ms, 0.05 * t)  # bytes over the step less its FLOPs
    alone = stream(t1, bw1)
    pairs = [stream(r[0], r[1]) + stream(r[3], r[4]) for r in rows(sys.argv[2])]
    node = max(med(pairs) if pick is med else max(pairs), alone)  # the fastest pair: the most GB/s
    return "%.2f %.2f %.2f %.2f" % (node, alone, flops, reread)
line = out(per_seq_ms)
if sys.argv[4]:  # a point's batch-4 runs beside its batch-1 ones: its own time a sequence adds
    t4 = pick(rows(sys.argv[4]))[0]
    line += " " + out((t4 - t1) / 3 if t4 > t1 else per_seq_ms)
print(line)
PY
  }
  local node_bw alone_bw flops reread_bw
  read -r node_bw alone_bw flops reread_bw < <(rates "$work/node")
  # plan's flag for the second pass, when one was seen.
  local reread_flag=()
  awk -v r="$reread_bw" 'BEGIN { exit !(r > 0) }' && reread_flag=(--reread-bw "$reread_bw")
  [ -n "$flops" ] || die "bench decode printed no ms / achieved / GFLOP/s lines"
  # Prefill's arithmetic: one rank alone on a --prompt-len prompt; its GFLOPs over its time less
  # the weights' read (a step is bytes + FLOPs), the rate the planner gets for prefill points.
  local pflops
  pflops=$(for ((rep = 0; rep < reps; rep++)); do
             "$PARALLM" bench prefill --model "$model" --threads 1 --prompt-len "$plen" |
               awk '/^  GFLOP\/s / {g = $2} /^  ms\/prompt/ {ms = $2} END {print g * ms / 1000, ms}'
           done | /usr/bin/python3 -c 'import sys
bytes_gb = float(sys.argv[1]); bw = float(sys.argv[2])
best = min((float(ms), float(gf)) for gf, ms in (l.split() for l in sys.stdin if l.strip()))
print("%.2f" % (best[1] / (best[0] / 1e3 - bytes_gb / bw)))' \
             "$(du -sb "$model"/*.safetensors | awk '{s += $1} END {print s / 1e9}')" "$alone_bw")
  echo "# prefill arithmetic, one rank, $plen-token prompt: $pflops GFLOP/s (plan --flops for the prefill points)"
  echo "# compute, one-thread ranks: node streams $node_bw GB/s, one rank alone $alone_bw GB/s, a sequence adds $flops GFLOP/s, a further 4 re-read the weights at $reread_bw GB/s (plan --mem-bw, --rank-mem-bw, --flops, --reread-bw; a step is bytes + FLOPs + re-reads)"
  # The presets keep the A100's link : memory ratios against what one rank streams here (unless
  # PLM_RANK_GBPS says otherwise); the default sweep goes below the slowest preset by 2, 4 and 8.
  [ -n "${PLM_RANK_GBPS:-}" ] || RANK_GBPS=$alone_bw
  [ "$sweep" != default ] || sweep=$(rate_of eth | awk '{printf "%.0f %.0f %.0f", $1 / 2, $1 / 4, $1 / 8}')
  echo "# presets: $(for p in $presets; do printf '%s=%s ' "$p" "$(rate_of "$p")"; done)Mbit/s (x $RANK_GBPS GB/s a rank); sweep: $sweep Mbit/s"

  cmd_up 2 --slots 2 >/dev/null
  cmd_latency | sed 's/^/# /'
  local res=$work/points.tsv comm=$work/comm
  mkdir -p "$comm"
  : >"$res"

  # bench comm between two ranks over LINK's path (one rank a node, or both in node0), at the
  # sizes decode sends (a quarter of one token's f32 hidden state to 16 of them: 2 KiB to 128 KiB
  # for the default model, whose token is 8 KiB, 64 KiB at batch 8);
  # a fit over larger sizes is dominated by them and misses the intercept that decode pays.
  # The DP training points' calibration (NAME ending in .train) takes the all-reduce alone, at the
  # gradient buckets' sizes (512 KiB to 4 MiB, 10 iterations), and again beside a computing thread
  # a rank (--load 1: the buckets reduced under the backward, which `bench train --threads 1`
  # runs on one thread), with what that thread kept of its speed: the JSON's beside_compute.
  calibrate() {  # NAME MAP(node|slot)
    local op rep ops=(all_reduce sendrecv) lo=$((row_bytes / 4)) hi=$((row_bytes * 16)) iters=20 load=()
    [[ $1 == *.train ]] && ops=(all_reduce) lo=$((512 << 10)) hi=$((4 << 20)) iters=10 load=(--load 1)
    for op in "${ops[@]}"; do
      for ((rep = 0; rep < reps; rep++)); do
        cmd_run -np 2 --map-by "$2" -- "$PARALLM" bench comm --op "$op" --algo auto \
          --min-bytes "$lo" --max-bytes "$hi" --step-factor 2 --iters "$iters" "${load[@]}" >>"$comm/$1.$op.txt" 2>&1 ||
          die "bench comm ($1, $op) failed: $(tail -3 "$comm/$1.$op.txt")"
      done
    done
    # Our own fit, not bench comm's: per size (the auto algorithm's rows, not the memcpy+barrier
    # reference) the fastest of --reps runs, then alpha + n / beta by
    # least squares on the relative error (a plain fit is ruled by the largest sizes and, on a
    # loaded machine, gave a negative slope or an intercept of a millisecond).
    # A shaped link's token bucket lets its burst (one MTU, see cmd_shape) through at once after
    # an idle spell: the planner's burst_bytes. (The packet more that htb allows past an empty
    # bucket did not show: per all-reduce of 8 KiB at 48-192 Mbit/s, decode saved 0.2-0.7 MTU
    # against bench comm's back-to-back rate, not 2.) None in one node.
    local burst=0
    [ "$2" = node ] && [ "$(cat "$STATE/mbit")" != 0 ] && burst=$(cat "$STATE/mtu")
    /usr/bin/python3 - "$comm/$1" "$skew_us" "$burst" <<'PY'
import json, os, sys
p, skew, burst = sys.argv[1], (0.0 if sys.argv[2] == "auto" else float(sys.argv[2])), int(sys.argv[3])
def fit(op, algo):
    best = {}
    for line in open(f"{p}.{op}.txt"):
        f = line.split()
        if len(f) >= 5 and f[0] == op and f[3] == algo and f[2].isdigit():
            n = int(f[2]) * 4  # f32 elements
            best[n] = min(best.get(n, 1e30), float(f[4]) * 1e-6)
    if len(best) < 2:
        return None
    pts = sorted(best.items())
    # minimise sum(((a + n x) - t) / t)^2 over a and x = 1 / beta: 2x2 normal equations.
    saa = sum(1 / t**2 for n, t in pts); sax = sum(n / t**2 for n, t in pts)
    sxx = sum(n * n / t**2 for n, t in pts)
    sat = sum(1 / t for n, t in pts); sxt = sum(n / t for n, t in pts)
    det = saa * sxx - sax * sax
    a = (sat * sxx - sax * sxt) / det
    x = (saa * sxt - sax * sat) / det
    if x <= 0 or a < 0:  # noise beat the slope: the best bandwidth seen, the smallest time
        x = min(t / n for n, t in pts)
        a = max(min(t for n, t in pts) - pts[0][0] * x, 0.0)
    return {"alpha_us": a * 1e6, "beta_gbps": 1e-9 / x}
ops, loaded = {}, {}
for op in ("all_reduce", "sendrecv"):
    if not os.path.exists(f"{p}.{op}.txt"):
        continue
    ops[op] = fit(op, "auto")
    if ops[op] is None:
        sys.exit(f"bench comm {op}: no table rows in {p}.{op}.txt")
    if fit(op, "loaded") is not None:
        loaded[op] = fit(op, "loaded")
cal = {"backend": "mpi", "world": 2, "ops": ops}
if skew > 0: cal["arrival_skew_us"] = skew
# bench comm's arrival-skew probe (its JSON line): the median of its runs, streaming and
# arithmetic each.
probes = []
for op in ("all_reduce", "sendrecv"):
    if os.path.exists(f"{p}.{op}.txt"):
        for line in open(f"{p}.{op}.txt"):
            if line.startswith("{") and "arrival_skew" in line:
                probes.append(json.loads(line)["arrival_skew"])
med = lambda v: sorted(v)[len(v) // 2]
# --load's rows (the fastest of the runs per size, as above) and the median of the runs' speeds.
speeds = [json.loads(line)["beside_compute"]["compute_speed"]
          for op in ops for line in open(f"{p}.{op}.txt")
          if line.startswith("{") and "beside_compute" in line]
if loaded and speeds:
    cal["beside_compute"] = {"threads": 1, "compute_speed": med(speeds), "ops": loaded}
if probes:
    cal["arrival_skew"] = {"ranks": probes[0]["ranks"], "stream": med([q["stream"] for q in probes]),
                           "compute": med([q["compute"] for q in probes])}
if burst > 0: cal["burst_bytes"] = burst
json.dump(cal, open(p + ".json", "w"))
print("# comm %-6s " % p.rsplit("/", 1)[1] + " | ".join(
    "%s alpha %7.2f us beta %9.6f GB/s" % (op, v["alpha_us"], v["beta_gbps"]) for op, v in ops.items())
      + " | burst %d B" % burst + ("" if not probes else " | arrival skew %.1f%% streaming, %.1f%% matmuls"
      % (100 * cal["arrival_skew"]["stream"], 100 * cal["arrival_skew"]["compute"]))
      + ("" if "beside_compute" not in cal else " | beside compute: all_reduce alpha %.1f us beta %.4f GB/s, %.2f of its speed"
      % (cal["beside_compute"]["ops"]["all_reduce"]["alpha_us"], cal["beside_compute"]["ops"]["all_reduce"]["beta_gbps"],
         cal["beside_compute"]["compute_speed"])))
PY
  }
  # A calibration made of the all-reduce of one link and the send/recv of another.
  mixcal() {  # OUT AR_FROM SR_FROM
    /usr/bin/python3 - "$@" <<'PY'
import json, sys
out, ar, sr = sys.argv[1:]
a = json.load(open(ar)); s = json.load(open(sr))
cal = {"backend": "mpi", "world": 2, "ops": {"all_reduce": a["ops"]["all_reduce"],
       "sendrecv": s["ops"]["sendrecv"]}}
for key in ("arrival_skew_us", "arrival_skew"):  # the TP group's: its all-reduce's link
    if key in a: cal[key] = a[key]
json.dump(cal, open(out, "w"))
PY
  }
  # Ranks taking turns on shared cores (TP=2 x PP=2 on fewer than 4 cores): bench comm's
  # core-sharing probe on the layout's four ranks, placed and pinned as its runs are (the TP
  # groups inside a node with --map-by slot, across with node), 5 runs (or --reps if more: one
  # run's efficiency moved 0.72-1.00 from run to run), the median into the layout's calibration (core_sharing; plan stretches the ranks' turns by
  # its inverse where two TP groups have work at once: batch 8's two micro-batches).
  shareprobe() {  # CAL MAP
    local rep o effs=()
    for ((rep = 0; rep < (reps > 5 ? reps : 5); rep++)); do
      o=$(cmd_run -np 4 --map-by "$2" -- "$here/cluster/pin-rank.sh" "$PARALLM" bench comm \
            --op all_reduce --algo auto --min-bytes 4K --max-bytes 4K --iters 5 --skew-rounds 0 \
            --share-probe 2 2>&1) || die "bench comm --share-probe ($1) failed: $(echo "$o" | tail -3)"
      effs+=("$(echo "$o" | /usr/bin/python3 -c 'import json, sys
print([json.loads(l) for l in sys.stdin if l.startswith("{")][-1]["core_sharing"]["efficiency"])')")
    done
    /usr/bin/python3 - "$1" "${effs[@]}" <<'PY'
import json, sys
p, effs = sys.argv[1], sorted(float(e) for e in sys.argv[2:])
c = json.load(open(p))
c["core_sharing"] = {"efficiency": effs[len(effs) // 2]}
json.dump(c, open(p, "w"))
name = p.rsplit("/", 1)[1][:-len(".json")]
print("# core sharing %-10s efficiency %.3f (median of %s)" % (name, effs[len(effs) // 2],
      " ".join("%.3f" % e for e in effs)))
PY
  }
  # A point's line: into points.tsv (the summary's) on the last pass; before it, shown as a comment.
  record() { if [ "$pass" = "$passes" ]; then tee -a "$res"; else cat; fi; }
  shown() { if [ "$pass" = "$passes" ]; then cat; else sed "s/^/# pass $pass of $passes: /"; fi; }
  fastest() { sort -g "$1" | head -1; }  # FILE of one time a line
  median() { sort -g "$1" | awk '{v[NR] = $1} END {print v[int(NR / 2) + 1]}'; }  # upper middle, as rates'
  faster() { [ -z "$2" ] || awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }  # MS BEST-SO-FAR
  # One decode run of a layout across the cluster (bench decode, 3 warm-up steps, --tokens timed;
  # the wrap array before the binary: TP=2 x PP=2's pinning); BATCH is the whole step's, DP its
  # replicas (each runs BATCH / DP).
  decode_run() {  # NP MAP BATCH DP FLAGS...
    local np=$1 map=$2 batch=$3 dp=$4 mb=()
    shift 4
    [ "$batch" = 1 ] && mb=(--micro-batches 1)
    cmd_run -np "$np" --map-by "$map" -- "${wrap[@]}" "$PARALLM" bench decode --model "$model" \
      --tokens "$tokens" --warmup 3 --threads 1 --batch "$((batch / dp))" "${mb[@]}" \
      --bandwidth 5 --comm-timeout 120 "$@" 2>&1
  }
  step_ms() { awk '/^  ms\/(step|token)/ && $3 > m {m = $3} END {print m}'; }  # of decode_run's output
  # The planner's ms a decode step for a layout with calibration CAL and the compute rates given.
  plan_decode() {  # CAL TP PP DP BATCH NODE_GBPS ALONE_GBPS GFLOPS
    "$PARALLM" plan --model "$model/config.json" --gpu cpu --gpus "$(($2 * $3 * $4))" --calibrate "$1" \
      --mem-bw "$6" --rank-mem-bw "$7" --flops "$8" "${reread_flag[@]}" --dtype "$dtype" \
      --act-dtype fp32 --batch "$5" --prompt-len 1 --output-len "$tokens" --tp "$2" --pp "$3" \
      --dp "$4" --shared-cores "$(nproc)" --json |
      /usr/bin/python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["layouts"][0]["tpot_ms"])'
  }
  measure() {  # LAYOUT LINK BATCH NP MAP CAL DECODE-FLAGS...
    local layout=$1 link=$2 batch=$3 np=$4 map=$5 cal=$6
    shift 6
    local out ms pred=nan stats dp=1
    # dp2: two replicas of batch/2, one a node, each its own one-rank job (--backend local under
    # mpirun); the step is the slower replica's.
    [ "$layout" = dp2 ] && dp=2
    # The fastest of --reps runs: on a shared machine the others' load only ever adds time.
    # A run that fails (seen now and then on the loaded machine: a rank leaving without
    # MPI_Finalize after its output) is retried, twice at most in a point, and counted.
    # What two ranks stream at once varies here from minute to minute (the cores' and the
    # memory's other tenants: a pair of one-rank runs took 11.2 ms a token in one minute and 14.5
    # in the next), so each point's planner gets the node's rate measured beside it: a pair of
    # one-rank batch-1 runs just before each of its runs, the fastest pair (as the runs are the
    # fastest of theirs; the pair beside the run kept was tried too, and missed more); and so is
    # one rank's alone (what a PP stage streams at batch 1), from a one-rank run beside the pair.
    # So is the FLOP rate: a one-rank batch-4 run beside the batch-1 one, the fastest of each,
    # gives the time a sequence adds, (t4 - t1) / 3, and with it the point's --flops (the start's
    # fit over 5 rounds of batch 1-8 is one minute's: 431 GFLOP/s at 19:27, where the points' own
    # came to 174-420; predicted both ways from the same runs, 39 of 49 decode points within 10%
    # against 31, the batch-8 points' mean error -5.1% against -12.3%). Batch 1 does not move
    # with it: the one-rank stream rate is the batch-1 step less that sequence's FLOPs, so their
    # sum is the batch-1 step either way. The prediction at the start's rate is printed beside.
    # --stat median takes the median of the runs and of the one-rank runs beside them instead
    # (the median pair for the node's rate); the line keeps the other statistic's at its end. In
    # one grid the median put 41 of 49 decode points within 10% against 44, its worst miss 15%
    # against 29%: a multi-rank run's median drifts up with the host's noise more than the
    # one-rank runs' beside it (benchmarks.md, 2026-12-04 09:30).
    # Each pass over the grid adds its runs (and the one-rank runs beside them) to the point's.
    local key=$layout.$link.$batch rep best worst o m fails=0
    local pairs=$work/node.$key alone=$work/alone.$key alone4=$work/alone4.$key runs=$work/runs.$key
    [ "$pass" != 1 ] || { : >"$pairs"; : >"$alone"; : >"$alone4"; : >"$runs"; }
    for ((rep = 0; rep < reps; rep++)); do
      decode1 1 >>"$alone"
      decode1 4 >>"$alone4"
      { decode1 1 >"$work/bw0" & decode1 1 >"$work/bw1"; wait; }
      cat "$work/bw0" "$work/bw1" | paste -sd' ' >>"$pairs"
      if ! o=$(decode_run "$np" "$map" "$batch" "$dp" --comm-stats "$@"); then
        fails=$((fails + 1)) retries=$((retries + 1))
        [ "$fails" -le 2 ] || { echo "$o" >&2; die "bench decode $layout $link b$batch failed 3 times"; }
        echo "# retry: bench decode $layout $link b$batch failed: $(echo "$o" | grep -m1 -E 'exit|rror|abort')" >&2
        rep=$((rep - 1))
        continue
      fi
      m=$(echo "$o" | step_ms)
      ! faster "$m" "$(fastest "$runs")" || echo "$o" >"$work/out.$key"
      echo "$m" >>"$runs"
    done
    best=$(fastest "$runs") worst=$(sort -g "$runs" | tail -1)
    out=$(cat "$work/out.$key")
    ms=$best
    # How far apart the point's runs came: (slowest - fastest) / fastest, what two layouts'
    # measurements must differ by before their order is the machine's and not the moment's.
    local spread
    spread=$(awk -v a="$best" -v b="$worst" 'BEGIN {printf "%.3f", b / a - 1}')
    # Per call (--comm-stats, warm-up and prefill included): the TP all-reduce, the PP send and
    # recv. An all-reduce's time includes waiting for the later peer (arrival skew); a recv's
    # includes the upstream stage's compute.
    stats=$(echo "$out" | awk '$1 == "tp" && $2 == "all_reduce" && $4 > 0 {ar = $7 / $4 * 1e6}
      $1 == "pp" && $2 == "send" && $4 > 0 {sd = $7 / $4 * 1e6}
      $1 == "pp" && $2 == "recv" && $4 > 0 {rv = $7 / $4 * 1e6}
      END {printf "%.0f/%.0f/%.0f", ar, sd, rv}')
    # --skew auto: the arrival skew the planner is given is measured once, on the in-node TP=2
    # point at batch 1 (its all-reduce time per call above the calibrated alpha).
    if [ "$skew_us" = auto ] && [ "$layout/$link/$batch/$pass" = tp2/shm/1/1 ]; then
      skew_us=$(/usr/bin/python3 -c 'import json, sys
a = json.load(open(sys.argv[1]))["ops"]["all_reduce"]["alpha_us"]
print("%.1f" % max(0.0, float(sys.argv[2]) - a))' "$cal" "${stats%%/*}")
      echo "# arrival skew: TP all-reduce in decode ${stats%%/*} us a call on shm -> plan gets arrival_skew_us $skew_us" >&2
      /usr/bin/python3 -c 'import json, sys
c = json.load(open(sys.argv[1]))
if float(sys.argv[2]) > 0: c["arrival_skew_us"] = float(sys.argv[2])
json.dump(c, open(sys.argv[1], "w"))' "$cal" "$skew_us"
    fi
    # The line's measured ms and the one-rank rates beside it by --stat, the other statistic's
    # (columns 12-14) beside them: of the point's runs and of the one-rank runs beside.
    local other=median o_ms o_rates line_rates point_node_bw point_alone_bw pn pa pf on oa of
    local pred_s=nan o_pred=nan
    line_rates=$(rates "$pairs" "$alone" "$alone4") o_rates=$(rates "$pairs" "$alone" "$alone4" median)
    o_ms=$(median "$runs")
    if [ "$stat" = median ]; then
      local fastest_rates=$line_rates
      other=fastest o_ms=$ms ms=$(median "$runs") line_rates=$o_rates o_rates=$fastest_rates
    fi
    read -r point_node_bw point_alone_bw _ _ pn pa pf _ <<<"$line_rates"
    read -r _ _ _ _ on oa of _ <<<"$o_rates"
    if [ "$do_plan" = 1 ]; then
      local tp=1 pp=1 a prev=""
      for a in "$@"; do case "$prev" in --tp) tp=$a ;; --pp) pp=$a ;; esac; prev=$a; done
      pred=$(plan_decode "$cal" "$tp" "$pp" "$dp" "$batch" "$pn" "$pa" "$pf")
      pred_s=$(plan_decode "$cal" "$tp" "$pp" "$dp" "$batch" "$point_node_bw" "$point_alone_bw" "$flops")
      o_pred=$(plan_decode "$cal" "$tp" "$pp" "$dp" "$batch" "$on" "$oa" "$of")
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$layout" "$link" "$batch" "$ms" "$pred" "$stats" \
      "$pn" "$pa" "$spread" "$pf" "$pred_s" "$other" "$o_ms" "$o_pred" |
      record | awk -F'\t' '{e = ($5 == "nan") ? "nan" : sprintf("%+.1f", ($5 / $4 - 1) * 100);
        printf "%-12s %-8s %5s %11s %12s %9s   us/call ar/send/recv %s, node/rank %s/%s GB/s, %s GFLOP/s, runs +%.1f%% | start FLOP rate %s %s | %s %s %s %s\n", $1, $2, $3, $4, $5, e, $6, $7, $8, $10, 100 * $9, $11,
          ($11 == "nan") ? "nan" : sprintf("%+.1f%%", ($11 / $4 - 1) * 100), $12, $13, $14,
          ($14 == "nan") ? "nan" : sprintf("%+.1f%%", ($14 / $13 - 1) * 100)}' | shown
  }

  # Prefill of one --prompt-len prompt (bench prefill: the timed pass after a warm-up; through the
  # stages for PP) against the planner's time to first token less one decode step.
  measure_prefill() {  # LAYOUT LINK NP MAP CAL FLAGS...
    local layout=$1 link=$2 np=$3 map=$4 cal=$5
    shift 5
    local rep best o pred=nan runs=$work/runs.$layout.$link.p$plen
    [ "$pass" != 1 ] || : >"$runs"
    for ((rep = 0; rep < reps; rep++)); do
      o=$(cmd_run -np "$np" --map-by "$map" -- "$PARALLM" bench prefill --model "$model" \
            --threads 1 --prompt-len "$plen" --comm-timeout 120 "$@" 2>&1) ||
        die "bench prefill $layout $link failed: $(echo "$o" | tail -3)"
      echo "$o" | awk '/^  ms\/prompt/ {print $2; exit}' >>"$runs"
    done
    best=$(fastest "$runs")
    if [ "$do_plan" = 1 ]; then
      local tp=1 pp=1 a prev=""
      for a in "$@"; do case "$prev" in --tp) tp=$a ;; --pp) pp=$a ;; esac; prev=$a; done
      pred=$("$PARALLM" plan --model "$model/config.json" --gpu cpu --gpus "$np" --calibrate "$cal" \
               --mem-bw "$node_bw" --rank-mem-bw "$alone_bw" --flops "$pflops" --dtype "$dtype" \
               --act-dtype fp32 --batch 1 --prompt-len "$plen" --output-len 1 --tp "$tp" --pp "$pp" \
               --json | /usr/bin/python3 -c 'import json,sys; l = json.load(sys.stdin)["layouts"][0]
print("%.3f" % (l["ttft_ms"]))')
    fi
    printf '%s\t%s\tp%s\t%s\t%s\t\t\t\n' "$layout" "$link" "$plen" "$best" "$pred" |
      record | awk -F'\t' '{e = ($5 == "nan") ? "nan" : sprintf("%+.1f", ($5 / $4 - 1) * 100);
        printf "%-12s %-8s %5s %11s %12s %9s   (prefill)\n", $1, $2, $3, $4, $5, e}' | shown
  }

  # DP=2 training: `bench train` on the `small` shape (3.4 M parameters: 13.7 MB of f32 gradients
  # in 2 MB buckets, so that their all-reduces overlap the last backward as a large model's 25 MB
  # buckets do), one replica a node and the gradients across the link, against `plan --train`
  # (its kernel rates measured by the planner itself, two one-thread ranks at once; the
  # all-reduce from a calibration at the buckets' sizes). Batch "t8": a step of 8 sequences.
  local tshape=(--seq-len 128 --micro-batch-size 4 --bucket-mb 2)
  "$PARALLM" init-model --shape small --seed 1 --out "$work/small" >/dev/null
  measure_train() {  # LINK MAP CAL
    local link=$1 map=$2 cal=$3 rep best o pred=nan runs=$work/runs.dp2-train.$1
    [ "$pass" != 1 ] || : >"$runs"
    for ((rep = 0; rep < reps; rep++)); do
      o=$(cmd_run -np 2 --map-by "$map" -- "$PARALLM" bench train --init small --dp 2 --threads 1 \
            "${tshape[@]}" --steps 3 --warmup 1 2>&1) ||
        die "bench train dp2 $link failed: $(echo "$o" | tail -3)"
      echo "$o" | awk '/^  ms\/step/ {print $2; exit}' >>"$runs"
    done
    best=$(fastest "$runs")
    if [ "$do_plan" = 1 ]; then
      pred=$("$PARALLM" plan --model "$work/small/config.json" --gpu cpu --gpus 2 --train --dp 2 \
               --seq-len 128 --micro-batch 4 --global-batch 8 --bucket-mb 2 --recompute none \
               --threads 1 --dtype fp32 --calibrate "$cal" --json |
             /usr/bin/python3 -c 'import json,sys; l = json.load(sys.stdin)["layouts"][0]
print("%.3f" % (1e3 * l["step_time_s"]))')
    fi
    printf '%s\t%s\tt8\t%s\t%s\t\t\t\n' dp2-train "$link" "$best" "$pred" |
      record | awk -F'\t' '{e = ($5 == "nan") ? "nan" : sprintf("%+.1f", ($5 / $4 - 1) * 100);
        printf "%-12s %-8s %5s %11s %12s %9s   (training step, ms)\n", $1, $2, $3, $4, $5, e}' | shown
  }

  # TP=2 x PP=2 is four ranks. On fewer than four cores they share cores: each rank pinned so
  # that a stage's two ranks are on different cores (cluster/pin-rank.sh). At batch 1 one stage
  # computes at a time; batch 8's two micro-batches keep both stages busy, and the ranks take
  # turns on the cores: the planner is told (plan --shared-cores, every point). Waiting ranks
  # poll in MPI and yield the core (mpi_yield_when_idle; the engine's PARALLM_MPI_WAIT default
  # here): with the scheduler's autogroups off (emulate-cluster.sh up) that beat sleeping between
  # polls (PARALLM_MPI_WAIT=sleep; TP pairs inside the nodes, nvlink, interleaved runs: batch 1
  # 5.7-7.8 ms a token against 7.6-8.4, batch 8 15.5-15.8 against 16.6-18.2). Under autogroups it
  # was the other way round (24-36 ms against 15-17): a yield passes the core only within its own
  # group, and each node was a group of its own.
  local wrap=()
  if [ "$(nproc)" -lt 4 ]; then
    echo "# TP=2 x PP=2 on $(nproc) cores: ranks pinned, taking turns on the cores (plan --shared-cores $(nproc))"
  fi
  if [ -n "$xo_batch" ]; then  # --crossover: the bisection (cluster/crossover.sh) instead of the grid
    # Default bracket: a quarter of eth's rate (batch 1's crossover was near half of it) to ib's.
    [ -n "$xo_lo" ] || xo_lo=$(rate_of eth | awk '{printf "%.0f", $1 / 4}')
    [ -n "$xo_hi" ] || xo_hi=$(rate_of ib)
    xo_search "$xo_batch" "$xo_lo" "$xo_hi" "$xo_pairs" "$xo_steps"
    return
  fi
  echo "# layout      link     batch measured_ms predicted_ms error_pct (batch pN: prefill of N tokens)"
  # The whole grid --passes times (default 1), its points in the same order each time; a point's
  # measured time the fastest of all its runs, its planner's rates those of the one-rank runs
  # beside them, also over all the passes. The links are calibrated (bench comm, the core sharing
  # probe) in the first pass only. Before the last pass each point's line so far is shown as a
  # comment ("# pass 1 of 2: ..."). Tried as the default against the host's minute-to-minute
  # noise (the same point in two grids 12% apart on average), 2 passes did worse than the first
  # alone: 39 of 49 decode points within 10% against 43 (2026-12-04 03:34, Zen 5 box); a second
  # pass found faster runs at 19 points (up to 25%) and the one-rank runs beside them did not
  # follow, so the fastest of more runs does not converge on the machine's quiet speed.
  local pass b p mbit name
  for ((pass = 1; pass <= passes; pass++)); do
    cmd_shape none >/dev/null
    [ "$pass" != 1 ] || calibrate shm slot
    for b in 1 8; do
      measure tp2 shm "$b" 2 slot "$comm/shm.json" --tp 2
      measure pp2 shm "$b" 2 slot "$comm/shm.json" --pp 2
    done
    measure_prefill tp2 shm 2 slot "$comm/shm.json" --tp 2
    measure_prefill pp2 shm 2 slot "$comm/shm.json" --pp 2
    [ "$pass" != 1 ] || calibrate shm.train slot
    measure_train shm slot "$comm/shm.train.json"
    # DP=2 at batch 8: two replicas, no traffic between them, so one point serves every link ("any").
    measure dp2 any 8 2 node "$comm/shm.json" --backend local
    for p in $presets $sweep; do
      mbit=$(rate_of "$p")
      name=$p
      [[ $p =~ ^[0-9.]+$ ]] && name=${p}M
      cmd_shape "$mbit" >/dev/null
      if [ "$pass" = 1 ]; then
        calibrate "$name" node
        mixcal "$comm/$name.tpin.json" "$comm/shm.json" "$comm/$name.json"
        mixcal "$comm/$name.tpx.json" "$comm/$name.json" "$comm/shm.json"
      fi
      case " $presets " in *" $p "*)
        if [ "$(nproc)" -lt 4 ] && [ "$pass" = 1 ]; then
          shareprobe "$comm/$name.tpin.json" slot
          shareprobe "$comm/$name.tpx.json" node
        fi ;;
      esac
      for b in 1 8; do
        measure tp2 "$name" "$b" 2 node "$comm/$name.json" --tp 2
        measure pp2 "$name" "$b" 2 node "$comm/$name.json" --pp 2
        case " $presets " in *" $p "*)  # TP=2 x PP=2 at the presets, not the sweep
          [ "$(nproc)" -ge 4 ] || wrap=("$here/cluster/pin-rank.sh")
          measure tp2pp2-tpin "$name" "$b" 4 slot "$comm/$name.tpin.json" --tp 2 --pp 2
          measure tp2pp2-tpx "$name" "$b" 4 node "$comm/$name.tpx.json" --tp 2 --pp 2
          wrap=() ;;
        esac
      done
      measure_prefill tp2 "$name" 2 node "$comm/$name.json" --tp 2
      measure_prefill pp2 "$name" 2 node "$comm/$name.json" --pp 2
      # Training across the presets only (a step over the sweep's slowest link takes ~8 s).
      case " $presets " in *" $p "*)
        [ "$pass" != 1 ] || calibrate "$name.train" node
        measure_train "$name" node "$comm/$name.train.json" ;;
      esac
      [ "$pass" != 1 ] || echo "$name $mbit" >>"$work/rates"
    done
  done
  cmd_down
  echo "# failed runs retried: $retries"

  # The planner's errors, its ranking of the layouts, and the crossovers (cluster/grid_summary.py).
  /usr/bin/python3 "$here/cluster/grid_summary.py" "$res" "$work/rates" "$comm" "$PARALLM" "$model" \
    "$node_bw" "$alone_bw" "$tokens" "$do_plan" "$skew_us" "$flops" "$dtype" "$reread_bw"
}
