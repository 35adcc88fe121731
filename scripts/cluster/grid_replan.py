#!/usr/bin/python3
"""Re-predicts a recorded grid's decode points (the output of `scripts/emulate-cluster.sh grid`)
with `parallm plan`, from what the grid printed: each link's calibration (its `# comm` line), each
point's node and one-rank streaming rates and its FLOP rate (grids since 2026-12-03 19:27; before,
the `# compute` line's), and the re-read rate of its `# compute` line, unless --flops /
--reread-bw replace them; the model's heads, KV heads and FFN width from the `# grid:` line (grids
since 2026-12-04 17:00; before, TinyLlama-1.1B's, the default model's) and `plan --shared-cores`
from the `# cpu:` line's cores. So a change to the planner, or to how the grid fits
its inputs, can be held to grids already measured, side by side with what they predicted.

Usage: grid_replan.py GRID.txt [GRID.txt ...] [--flops GFLOPS] [--reread-bw GBPS] [--core-sharing E]
                      [--parallm BIN]
--core-sharing gives the TP=2 x PP=2 points' calibrations a core-sharing efficiency (bench comm
--share-probe) where the grid printed none (its `# core sharing` lines, grids since 2026-12-03 23:30).
Prints one line per decode point (layout link batch measured, the grid's prediction and error,
the new one and its error), then how many of each are within 10% and their mean |error|, and the
crossovers below which PP=2 beats TP=2 at the grid's rates: measured, as the grid predicted them,
replanned (crossing.py, as grid_summary.py reads them).
Given several grids, each in turn under a `# grid PATH` line, then pooled over them: the medians of
the measured and the replanned crossovers, how many grids' replanned crossover is within 1.25x of
their measured, and how many pairs of grids measured theirs within 1.25x of each other (how far the
measurement repeats itself); and each decode point's median error over the grids (the sweep's
rates named sweep1 on, as each grid scales them to its own machine).
"""
import argparse, itertools, json, math, os, re, subprocess, sys, tempfile

from crossing import crossing, describe  # beside this script

here = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("grid", nargs="+")
ap.add_argument("--flops")
ap.add_argument("--reread-bw")
ap.add_argument("--core-sharing", type=float)
ap.add_argument("--parallm", default=os.environ.get("PARALLM", os.path.join(here, "../../build/parallm")))
a = ap.parse_args()

def replan(path):
    """Re-predicts one grid: prints its points and summary, returns its crossovers
    {batch: (measured, grid predicted, replanned)} (crossing.crossing at the grid's rates)."""
    text = open(path).read()
    # The heads and FFN width: grids since 2026-12-04 17:00 (before, the bench shape's).
    head = re.search(r"\(hidden (\d+), (\d+) layers, vocab (\d+), (\w+)"
                     r"(?:, (\d+) heads, (\d+) KV heads, FFN (\d+))?\), (\d+) timed tokens", text)
    cores = re.search(r"^# cpu: .*, (\d+) cores;", text, re.M)  # plan --shared-cores, as the grid ran it
    rates = re.search(r"a sequence adds ([\d.]+) GFLOP/s(?:, a further 4 re-read the weights at ([\d.]+) GB/s)?", text)
    if not head or not rates:
        sys.exit(f"grid_replan: {path}: no '# grid:' model line or '# compute:' rates line")
    flops = a.flops or rates.group(1)
    reread = a.reread_bw or rates.group(2)
    if reread and not float(reread) > 0:  # 0: the grid saw no second pass (grid.sh), as grid_summary.py
        reread = None
    comm, pts, sharing = {}, [], {}
    share_re = re.compile(r"# core sharing (\S+)\s+efficiency ([\d.]+)")
    line_re = re.compile(r"# comm (\S+)\s+all_reduce alpha\s+([\d.]+) us beta\s+([\d.]+) GB/s"
                         r"(?: \| sendrecv alpha\s+([\d.]+) us beta\s+([\d.]+) GB/s)? \| burst (\d+) B"
                         r"(?: \| arrival skew ([\d.]+)% streaming, ([\d.]+)% matmuls)?")
    for l in text.splitlines():
        m = share_re.match(l)
        if m:
            sharing[m.group(1)] = float(m.group(2))
            continue
        m = line_re.match(l)
        if m:
            g = m.groups()
            comm[g[0]] = {"ar": (float(g[1]), float(g[2])), "sr": (float(g[3]), float(g[4])) if g[3] else None,
                          "burst": int(g[5]), "skew": (float(g[6]) / 100, float(g[7]) / 100) if g[6] else None}
            continue
        f = l.split()
        nr = re.search(r"node/rank ([\d.]+)/([\d.]+) GB/s(?:, ([\d.]+) GFLOP/s)?", l)
        if not l.startswith("#") and len(f) >= 6 and f[2].isdigit() and nr:
            # A point's own FLOP rate (grids since 2026-12-03 19:27) unless --flops replaces it.
            pts.append((f[0], f[1], int(f[2]), float(f[3]), float(f[4]), nr.group(1), nr.group(2),
                        a.flops or nr.group(3) or flops))
    if not pts:
        sys.exit(f"grid_replan: {path}: no decode points")

    # The grid's model: the bench shape with its layers (the weights do not matter to the planner).
    cfg = json.load(open(os.path.join(here, "../../bench/configs/tinyllama-vocab2048.json")))
    cfg.update(hidden_size=int(head.group(1)), num_hidden_layers=int(head.group(2)),
               vocab_size=int(head.group(3)), torch_dtype=head.group(4))
    if head.group(5):  # the grid's own model's heads and FFN (grid --model)
        cfg.update(num_attention_heads=int(head.group(5)), num_key_value_heads=int(head.group(6)),
                   intermediate_size=int(head.group(7)))
    tmp = tempfile.mkdtemp()
    json.dump(cfg, open(f"{tmp}/config.json", "w"))
    dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(head.group(4), "fp32")


    def calibration(layout, link):  # as the grid builds it (grid.sh: calibrate, mixcal)
        ar, sr = link, link
        if layout == "tp2pp2-tpin": ar = "shm"   # the TP pairs inside a node, the stages across
        if layout == "tp2pp2-tpx": sr = "shm"    # the TP pairs across, the stages inside a node
        if layout == "dp2": ar = sr = "shm"
        cal = {"backend": "mpi", "world": 2, "ops": {
            "all_reduce": {"alpha_us": comm[ar]["ar"][0], "beta_gbps": comm[ar]["ar"][1]},
            "sendrecv": {"alpha_us": comm[sr]["sr"][0], "beta_gbps": comm[sr]["sr"][1]}}}
        if comm[ar]["skew"]:
            cal["arrival_skew"] = {"ranks": 2, "stream": comm[ar]["skew"][0], "compute": comm[ar]["skew"][1]}
        tag = {"tp2pp2-tpin": ".tpin", "tp2pp2-tpx": ".tpx"}.get(layout)
        if tag and (link + tag in sharing or a.core_sharing):
            cal["core_sharing"] = {"efficiency": sharing.get(link + tag, a.core_sharing)}
        if layout in ("tp2", "pp2") and comm[link]["burst"] > 0:
            cal["burst_bytes"] = comm[link]["burst"]
        return cal


    errs = ([], [])
    got = {}  # (layout, link, batch) -> (measured, grid's prediction, replanned)
    for layout, link, b, meas, pred, node, alone, point_flops in pts:
        tp, pp, dp = 2 if layout.startswith("tp2") else 1, 2 if "pp2" in layout else 1, 2 if layout == "dp2" else 1
        json.dump(calibration(layout, link), open(f"{tmp}/cal.json", "w"))
        out = subprocess.run([a.parallm, "plan", "--model", f"{tmp}/config.json", "--gpu", "cpu",
                              "--gpus", str(tp * pp * dp), "--calibrate", f"{tmp}/cal.json", "--mem-bw", node,
                              "--rank-mem-bw", alone, "--flops", point_flops] +
                             (["--reread-bw", reread] if reread else []) +
                             ["--dtype", dtype, "--act-dtype", "fp32", "--batch", str(b), "--prompt-len", "1",
                              "--output-len", head.group(8), "--tp", str(tp), "--pp", str(pp), "--dp", str(dp),
                              "--shared-cores", cores.group(1) if cores else "2", "--json"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"grid_replan: plan failed for {layout} {link} {b}: {out.stderr.strip()}")
        new = json.loads(out.stdout)["layouts"][0]["tpot_ms"]
        got[(layout, link, b)] = (meas, pred, new)
        errs[0].append(abs(pred / meas - 1))
        errs[1].append(abs(new / meas - 1))
        print("%-12s %-8s %2d %9.2f   grid %9.3f %+6.1f%%   replanned %9.3f %+6.1f%%"
              % (layout, link, b, meas, pred, (pred / meas - 1) * 100, new, (new / meas - 1) * 100))
    # The FLOP rate each prediction had: the start's, each point's own (grids that print one), or --flops.
    own = re.search(r"GB/s, [\d.]+ GFLOP/s", text)
    for name, e in zip(("grid", "replanned"), errs):
        print("# %s (--flops %s%s): %d of %d decode points within 10%%, mean |error| %.1f%%, max %.1f%%"
              % (name, ("each point's own" if own and (name == "grid" or not a.flops) else
                        rates.group(1) if name == "grid" else flops),
                 "" if not (rates.group(2) if name == "grid" else reread) else
                 ", --reread-bw %s" % (rates.group(2) if name == "grid" else reread),
                 sum(x < 0.1 for x in e), len(e), 100 * sum(e) / len(e), 100 * max(e)))
    # The crossovers at the grid's shaped rates (its `# presets:` line: the presets by name, the
    # sweep's rates as "<rate>M"), measured and predicted, as grid_summary.py reads them off the
    # points ("predicted at the grid's rates"), and replanned.
    pr = re.search(r"^# presets: (.*?) Mbit/s \(x .*?\); sweep: ([\d ]*) Mbit/s", text, re.M)
    shaped = dict((n, float(r)) for n, r in (kv.split("=") for kv in pr.group(1).split())) if pr else {}
    shaped.update({f"{r}M": float(r) for r in (pr.group(2).split() if pr else [])})
    result = {}
    for b in (1, 8):
        both = [(r, got[("tp2", n, b)], got[("pp2", n, b)]) for n, r in shaped.items()
                if ("tp2", n, b) in got and ("pp2", n, b) in got]
        result[b] = tuple(crossing([(r, t[k], q[k]) for r, t, q in both]) for k in range(3))
        print("# crossover batch %d at the grid's rates: measured %s, grid predicted %s, replanned %s"
              % ((b,) + tuple(describe([(r, t[k], q[k]) for r, t, q in both]) for k in range(3))))
    # The points by a name that holds across grids (each scales its presets to its own machine):
    # the sweep's rates as "sweep1" (the fastest) on.
    order = {f"{r}M": f"sweep{i + 1}" for i, r in
             enumerate(sorted((pr.group(2).split() if pr else []), key=float, reverse=True))}
    result["points"] = {(lay, order.get(link, link), b): v for (lay, link, b), v in got.items()}
    return result


def pooled(name, cs):  # crossing() results over grids -> (median, words)
    """Crossovers of several grids -> their median and "median X Mbit/s (lo-hi)". A grid where
    one layout was faster at every rate counts at the end of its rates (PP everywhere: at its
    fastest rate; TP everywhere: at its slowest), a bound on its own side of the median."""
    cs = [c for c in cs if c]
    if not cs:
        return None, "%s n/a" % name
    v = sorted(r for _, r in cs)
    m = v[len(v) // 2] if len(v) % 2 else math.sqrt(v[len(v) // 2 - 1] * v[len(v) // 2])
    at = [r for kind, r in cs if kind == "at"]
    ends = ["%d PP faster at every rate" % sum(k == "pp" for k, _ in cs),
            "%d TP faster at every rate" % sum(k == "tp" for k, _ in cs)]
    return m, "%s median %.0f Mbit/s (%.0f-%.0f%s)" % (
        name, m, min(at or [m]), max(at or [m]), "".join(", " + e for e in ends if e[0] != "0"))


results = []
for g in a.grid:
    if len(a.grid) > 1:
        print("# grid %s" % g)
    results.append(replan(g))
if len(a.grid) > 1:
    # Over the grids: the crossover each measured and what the planner of today predicts from
    # each grid's own inputs, their medians, and how far the measurement repeats itself: of the
    # pairs of grids, how many measured crossovers within 1.25x of each other (the goal's factor).
    for b in (1, 8):
        meas = [r[b][0] for r in results]
        new = [r[b][2] for r in results]
        mm, ms = pooled("measured", meas)
        nm, ns = pooled("replanned", new)
        at = [c[1] for c in meas if c and c[0] == "at"]
        pairs = list(itertools.combinations(at, 2))
        close = sum(max(x, y) / min(x, y) <= 1.25 for x, y in pairs)
        own = [(m[1], n[1]) for m, n in zip(meas, new) if m and n and m[0] == n[0] == "at"]
        own_close = sum(max(x, y) / min(x, y) <= 1.25 for x, y in own)
        print("# pooled over %d grids, crossover batch %d: %s, %s%s; each grid's replanned within "
              "1.25x of its measured: %d of %d; grids' measured within 1.25x of each other: %d of "
              "%d pairs" % (len(a.grid), b, ms, ns,
                            ", measured/replanned %.2fx" % (mm / nm) if mm and nm else "",
                            own_close, len(own), close, len(pairs)))
    # Each point (layout, link, batch) over the grids that measured it: the median of its errors,
    # replanned against measured; the goal's 10% held to a point's typical error, not one minute's.
    median = lambda v: sorted(v)[len(v) // 2] if len(v) % 2 else sum(sorted(v)[len(v) // 2 - 1:len(v) // 2 + 1]) / 2
    times = {}  # (layout, link, batch) -> ([measured ms], [replanned ms]), a pair a grid
    for r in results:
        for k, (meas, _, new) in r["points"].items():
            times.setdefault(k, ([], []))
            times[k][0].append(meas)
            times[k][1].append(new)
    med_err = {k: median([n / m - 1 for m, n in zip(*t)]) for k, t in times.items()}
    worst = sorted(med_err.items(), key=lambda kv: -abs(kv[1]))[:3]
    print("# pooled over %d grids, decode: %d of %d points' median error within 10%%, mean |median "
          "error| %.1f%%; the largest: %s" % (
              len(a.grid), sum(abs(e) < 0.1 for e in med_err.values()), len(med_err),
              100 * sum(abs(e) for e in med_err.values()) / len(med_err),
              ", ".join("%s %s b%d %+.1f%% (%d grids)" % (k + (100 * e, len(times[k][0])))
                        for k, e in worst)))
    # The ranking of the layouts at each link and batch by their median times over the grids,
    # measured and replanned (DP=2's point, link "any", joins every link at its batch, as in
    # grid_summary.py): the fastest named right, and each two layouts ordered as measured.
    fastest = total = right = pairs = 0
    for n, b in sorted({(n, b) for (_, n, b) in times if n != "any"}):
        lays = {lay: (median(m), median(p)) for (lay, n2, b2), (m, p) in times.items()
                if b2 == b and n2 in (n, "any")}
        if len(lays) < 2:
            continue
        meas = sorted(lays, key=lambda k: lays[k][0])
        total += 1
        pred = sorted(lays, key=lambda k: lays[k][1])
        fastest += meas[0] == pred[0]
        if meas[0] != pred[0]:
            print("# pooled ranking at %s batch %d: measured %s, replanned %s" % (
                n, b, " < ".join(meas), " < ".join(pred)))
        for i, x in enumerate(meas):
            for y in meas[i + 1:]:
                pairs += 1
                right += lays[x][1] <= lays[y][1]
    print("# pooled over %d grids, ranking by median times: fastest layout named right at %d of %d "
          "link/batch pairs; %d of %d pairs of layouts ordered as measured" % (
              len(a.grid), fastest, total, right, pairs))
