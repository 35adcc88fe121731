#!/usr/bin/python3
"""Re-predicts a recorded grid's decode points (the output of `scripts/emulate-cluster.sh grid`)
with `parallm plan`, from what the grid printed: each link's calibration (its `# comm` line), each
point's node and one-rank streaming rates and its FLOP rate (grids since 2026-12-03 19:27; before,
the `# compute` line's), and the re-read rate of its `# compute` line, unless --flops /
--reread-bw replace them; the model's heads, KV heads and FFN width from the `# grid:` line (grids
since 2026-12-04 17:00; before, TinyLlama-1.1B's, the default model's) and `plan --shared-cores`
from the `# cpu:` line's cores. So a change to the planner, or to how the grid fits
its inputs, can be held to grids already measured, side by side with what they predicted.

Usage: grid_replan.py GRID.txt [--flops GFLOPS] [--reread-bw GBPS] [--core-sharing E] [--parallm BIN]
--core-sharing gives the TP=2 x PP=2 points' calibrations a core-sharing efficiency (bench comm
--share-probe) where the grid printed none (its `# core sharing` lines, grids since 2026-12-03 23:30).
Prints one line per decode point (layout link batch measured, the grid's prediction and error,
the new one and its error), then how many of each are within 10% and their mean |error|.
"""
import argparse, json, os, re, subprocess, sys, tempfile

here = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("grid")
ap.add_argument("--flops")
ap.add_argument("--reread-bw")
ap.add_argument("--core-sharing", type=float)
ap.add_argument("--parallm", default=os.environ.get("PARALLM", os.path.join(here, "../../build/parallm")))
a = ap.parse_args()

text = open(a.grid).read()
# The heads and FFN width: grids since 2026-12-04 17:00 (before, the bench shape's).
head = re.search(r"\(hidden (\d+), (\d+) layers, vocab (\d+), (\w+)"
                 r"(?:, (\d+) heads, (\d+) KV heads, FFN (\d+))?\), (\d+) timed tokens", text)
cores = re.search(r"^# cpu: .*, (\d+) cores;", text, re.M)  # plan --shared-cores, as the grid ran it
rates = re.search(r"a sequence adds ([\d.]+) GFLOP/s(?:, a further 4 re-read the weights at ([\d.]+) GB/s)?", text)
if not head or not rates:
    sys.exit(f"grid_replan: {a.grid}: no '# grid:' model line or '# compute:' rates line")
flops = a.flops or rates.group(1)
reread = a.reread_bw or rates.group(2)
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
    sys.exit(f"grid_replan: {a.grid}: no decode points")

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
