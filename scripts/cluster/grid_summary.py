#!/usr/bin/python3
"""The grid's summary (scripts/cluster/grid.sh): the planner's error per kind of point, its ranking
of the layouts at each link and batch, and the crossovers below which PP=2 beats TP=2, measured
(log-linear between the grid's rates, with the range the points' runs spread allows) and
predicted (the planner over a fine sweep of rates, each with the shaped links' measured latency
and a bandwidth of that rate times the efficiency bench comm measured on them).

Usage: grid_summary.py POINTS.tsv RATES COMM_DIR PARALLM MODEL_DIR NODE_GBPS ALONE_GBPS TOKENS
       DO_PLAN(0|1) SKEW_US FLOPS DTYPE
POINTS.tsv: one line a point, "layout link batch measured_ms predicted_ms stats node_gbps
alone_gbps spread gflops predicted_at_start_ms other_stat other_measured_ms other_predicted_ms"
tab-separated (batch pN: prefill, tN: training step; the columns from spread on decode's alone,
those from predicted_at_start_ms on optional; other_stat: the statistic of the runs grid.sh --stat
did not pick, "fastest" or "median"); RATES: "name mbit" a line.
"""
import json, re, subprocess, sys
from crossing import describe as crossover  # beside this script
res, rates_f, comm, parallm, model, node_bw, alone_bw, tokens, do_plan, skew, flops, dtype = sys.argv[1:13]
# The GEMV's second pass over the weights (grid.sh: plan --reread-bw; absent or 0: none seen).
reread = sys.argv[13] if len(sys.argv) > 13 and float(sys.argv[13]) > 0 else None
skew = 0.0 if skew == "auto" else float(skew)  # "auto" left only if the shm point never ran
rates = dict(l.split() for l in open(rates_f))
pts, node_rates, prefill, training, spread, at_start, point_flops = {}, [], {}, {}, {}, {}, []
other, other_name = {}, ""
for l in open(res):
    layout, link, b, ms, pred = l.split("\t")[:5]
    if b.startswith("p"):  # prefill points: their own error line, not in the crossovers
        prefill[(layout, link)] = (float(ms), float(pred))
        continue
    if b.startswith("t"):  # training steps: likewise
        training[(layout, link)] = (float(ms), float(pred))
        continue
    pts[(layout, link, int(b))] = (float(ms), float(pred))
    f = l.rstrip("\n").split("\t")
    if len(f) > 8 and f[8]:  # (slowest - fastest) / fastest of the point's runs
        spread[(layout, link, int(b))] = float(f[8])
    if len(f) > 10 and f[10] and f[10] != "nan":  # predicted at the start's FLOP rate (grid.sh)
        at_start[(layout, link, int(b))] = (float(ms), float(f[10]))
    if len(f) > 13 and f[13] and f[13] != "nan":  # the other statistic of the runs (grid.sh --stat)
        other[(layout, link, int(b))] = (float(f[12]), float(f[13]))
        other_name = f[11]
    node_rates.append((float(l.split("\t")[6]), float(l.split("\t")[7])))
    if len(f) > 9 and f[9]:  # the point's own FLOP rate (grid.sh)
        point_flops.append(float(f[9]))
# The sweep's node and rank rates (and FLOP rate, below): the medians of those measured beside the
# points (the ones at the start are one minute's).
if node_rates:
    node_bw = "%.2f" % sorted(r[0] for r in node_rates)[len(node_rates) // 2]
    alone_bw = "%.2f" % sorted(r[1] for r in node_rates)[len(node_rates) // 2]
if point_flops:  # and the FLOP rate, where the points measured their own
    flops = "%.2f" % sorted(point_flops)[len(point_flops) // 2]
# (The TP=2 x PP=2 points on fewer than 4 cores count as the others: the planner was told the
# cores the ranks share, plan --shared-cores.)
for what, d in (("decode", pts), ("decode at the start's FLOP rate", at_start),
                ("decode, the %s of the runs and the one-rank runs beside them" % other_name, other),
                ("prefill", prefill), ("training step", training)):
    errs = [abs(p / m - 1) for (m, p) in d.values() if p == p]
    if errs:
        print("# planner error, %s: mean |error| %.1f%%, max %.1f%% over %d points, %d within 10%%"
              % (what, 100 * sum(errs) / len(errs), 100 * max(errs), len(errs),
                 sum(e <= 0.1 for e in errs)))

# The planner's ranking of the layouts measured at each link and batch (DP=2's point, link "any",
# joins every link at its batch): the fastest named right, and the whole order.
# By pairs too: each two layouts at a link and batch, ordered as measured or not; a pair the
# planner orders the other way whose measurements are closer than either point's own runs differ
# (the spread above) is one the grid cannot order either.
pairs = {"total": 0, "right": 0, "close": 0}
def ranking(pts, show):  # -> (fastest named right, whole order right, link/batch pairs)
    fastest = order = total = 0
    for n, b in sorted({(n, b) for (_, n, b) in pts if n != "any"}):
        keys = {lay: (lay, n2, b2) for (lay, n2, b2) in pts if b2 == b and n2 in (n, "any")}
        lays = {lay: pts[k] for lay, k in keys.items()}
        if len(lays) < 2 or any(p != p for _, p in lays.values()):
            continue
        meas = sorted(lays, key=lambda k: lays[k][0])
        pred = sorted(lays, key=lambda k: lays[k][1])
        total += 1
        fastest += meas[0] == pred[0]
        order += meas == pred
        if show and meas != pred:
            print("# ranking at %s batch %d: measured %s, predicted %s" % (n, b, " < ".join(meas), " < ".join(pred)))
        if show:
            for i, x in enumerate(meas):
                for y in meas[i + 1:]:
                    pairs["total"] += 1
                    if lays[x][1] <= lays[y][1]:
                        pairs["right"] += 1
                    elif lays[y][0] / lays[x][0] - 1 <= max(spread.get(keys[x], 0), spread.get(keys[y], 0)):
                        pairs["close"] += 1
    return fastest, order, total
fastest, order, total = ranking(pts, True)
if total:
    print("# planner ranking: fastest layout named right at %d of %d link/batch pairs, whole order at %d"
          % (fastest, total, order))
if pairs["total"] and spread:
    print("# planner ranking by pairs of layouts: %d of %d ordered as measured; of the %d others, %d "
          "measured closer than their points' runs spread" % (pairs["right"], pairs["total"],
          pairs["total"] - pairs["right"], pairs["close"]))

shaped = {n: float(r) for n, r in rates.items() if float(r) > 0}
# Efficiency and latency of the shaped links, for the planner's sweep.
eff, ar_a, sr_a, sk = [], [], [], []
for n, r in (shaped.items() if do_plan == "1" else ()):
    j = json.load(open(f"{comm}/{n}.json")); c = j["ops"]
    eff.append(c["sendrecv"]["beta_gbps"] * 8000 / r)
    ar_a.append(c["all_reduce"]["alpha_us"]); sr_a.append(c["sendrecv"]["alpha_us"])
    if "arrival_skew" in j: sk.append(j["arrival_skew"])
med = lambda v: sorted(v)[len(v) // 2]
for b in (1, 8):
    meas = [(r, pts[("tp2", n, b)][0], pts[("pp2", n, b)][0]) for n, r in shaped.items()
            if ("tp2", n, b) in pts and ("pp2", n, b) in pts]
    pred_pts = [(r, pts[("tp2", n, b)][1], pts[("pp2", n, b)][1]) for n, r in shaped.items()
                if ("tp2", n, b) in pts and pts[("tp2", n, b)][1] == pts[("tp2", n, b)][1]]
    line = "crossover batch %d: measured %s" % (b, crossover(meas))
    # How far the runs' spread moves it: TP at its fastest run and PP at its slowest put it at the
    # lowest rate, the other way round at the highest (the fastest run: the line's, or with
    # grid.sh --stat median the other statistic's; the slowest that x (1 + spread)).
    keys = [(n, r) for n, r in shaped.items() if ("tp2", n, b) in pts and ("pp2", n, b) in pts]
    if keys and all((l, n, b) in spread for n, _ in keys for l in ("tp2", "pp2")):
        fast = lambda k: other[k][0] if other_name == "fastest" and k in other else pts[k][0]
        slow = lambda k: fast(k) * (1 + spread[k])
        lo = crossover([(r, fast(("tp2", n, b)), slow(("pp2", n, b))) for n, r in keys])
        hi = crossover([(r, slow(("tp2", n, b)), fast(("pp2", n, b))) for n, r in keys])
        bound = lambda c: re.sub(r"^PP faster at every rate \(>= (.+)\)$", r"over \1",
                                 re.sub(r"^TP faster at every rate \(down to (.+)\)$", r"under \1", c))
        line += " (the points' runs spread allows %s to %s)" % (bound(lo).replace(" Mbit/s", ""), bound(hi))
    if do_plan == "1" and eff:
        sweep, e = [], med(eff)
        tmp = comm + "/sweep.json"
        r, low = 2 * max(shaped.values()), min(shaped.values()) / 2
        while r >= low:
            beta = r * e / 8000
            cal = {"backend": "mpi", "world": 2, "ops": {
                "all_reduce": {"alpha_us": med(ar_a), "beta_gbps": beta},
                "sendrecv": {"alpha_us": med(sr_a), "beta_gbps": beta}}}
            if skew > 0: cal["arrival_skew_us"] = skew
            if sk:  # the probes' median over the links
                cal["arrival_skew"] = {"ranks": sk[0]["ranks"], "stream": med([q["stream"] for q in sk]),
                                       "compute": med([q["compute"] for q in sk])}
            # The bucket that shape would give this rate: one MTU, 80 us of the rate (emulate-cluster.sh
            # cmd_shape: within 1500 B and 64000 B).
            cal["burst_bytes"] = int(min(max(r * 1e6 / 8 * 8e-5, 1500), 64000))
            json.dump(cal, open(tmp, "w"))
            t = []
            for lay in (["--tp", "2"], ["--pp", "2"]):
                out = subprocess.run([parallm, "plan", "--model", model + "/config.json", "--gpu", "cpu",
                    "--gpus", "2", "--calibrate", tmp, "--mem-bw", node_bw, "--rank-mem-bw", alone_bw,
                    "--flops", flops] + (["--reread-bw", reread] if reread else []) + [
                    "--dtype", dtype, "--act-dtype", "fp32", "--batch", str(b), "--prompt-len", "1",
                    "--output-len", tokens, "--json"] + lay, capture_output=True, text=True, check=True)
                t.append(json.loads(out.stdout)["layouts"][0]["tpot_ms"])
            sweep.append((r, t[0], t[1]))
            r /= 1.25
        line += ", predicted %s (planner sweep, link efficiency %.2f, alpha %.0f/%.0f us, node/rank %s/%s GB/s, %s GFLOP/s)" % (
            crossover(sweep), e, med(ar_a), med(sr_a), node_bw, alone_bw, flops)
        line += ", predicted at the grid's rates %s" % crossover(pred_pts)
    print(line)
