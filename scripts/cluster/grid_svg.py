#!/usr/bin/python3
"""Draw `emulate-cluster.sh grid` output as an SVG: decode ms per step against link bandwidth,
TP=2, PP=2 and TP=2 x PP=2 (its TP pairs inside a node, or across the link), measured (solid,
dots) beside predicted (dashed, rings), one panel per batch.

Usage: scripts/cluster/grid_svg.py GRID_OUTPUT.txt > grid.svg
The in-node ("shm") points stand in a column of their own at the right of each panel.
"""
import math
import re
import sys

# Layout -> (colour, legend name).
LAYOUTS = {"tp2": ("#c0392b", "TP=2"), "pp2": ("#2471a3", "PP=2"),
           "tp2pp2-tpin": ("#1e8449", "TP=2 x PP=2, TP in a node"),
           "tp2pp2-tpx": ("#ca6f1e", "TP=2 x PP=2, TP across")}


def parse(text):
    rates, pts, title = {}, {}, ""
    for line in text.splitlines():
        if line.startswith("# presets:"):
            for name, mbit in re.findall(r"(\w+)=([0-9.]+)", line.split(";")[0]):
                rates[name] = float(mbit)
            sweep = line.split("sweep:")[1] if "sweep:" in line else ""
            for mbit in re.findall(r"[0-9.]+", sweep.replace("Mbit/s", "")):
                rates[f"{float(mbit):g}M"] = float(mbit)
        elif line.startswith("# cpu:"):
            title = line[2:].strip()
        elif not line.startswith("#"):
            f = line.split()
            if len(f) >= 6 and f[0] in LAYOUTS and f[2] in ("1", "8"):
                pts[(f[0], f[1], int(f[2]))] = (float(f[3]), float(f[4]))
    return rates, pts, title


def draw(rates, pts, title):
    W, H, pad, gap = 900, 420, 60, 40
    pw = (W - 2 * pad - gap) / 2
    links = [l for l in rates if any((lay, l, b) in pts for lay in LAYOUTS for b in (1, 8))]
    if not links:
        sys.exit("grid_svg.py: no grid points (lines 'tp2 LINK BATCH measured predicted ...')")
    xs = [rates[l] for l in links]
    lx0, lx1 = math.log10(min(xs) / 1.5), math.log10(max(xs) * 1.5)
    ms = [v for p in pts.values() for v in p if v == v and v > 0]
    ly0, ly1 = math.log10(min(ms) / 1.3), math.log10(max(ms) * 1.3)
    shm_w = 50  # the in-node column
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">decode ms per step on an '
           'emulated 2-node cluster: measured (solid) and predicted by parallm plan (dashed)</text>',
           f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" fill="#555">{title}</text>']
    for i, b in enumerate((1, 8)):
        x0 = pad + i * (pw + gap)
        y0, y1 = 40, H - 70
        plot_w = pw - shm_w

        def X(mbit):
            return x0 + (math.log10(mbit) - lx0) / (lx1 - lx0) * plot_w

        def Y(v):
            return y1 - (math.log10(v) - ly0) / (ly1 - ly0) * (y1 - y0)

        sx = x0 + plot_w + shm_w / 2
        out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{y1 - y0}" fill="none" stroke="#999"/>')
        out.append(f'<line x1="{x0 + plot_w}" y1="{y0}" x2="{x0 + plot_w}" y2="{y1}" stroke="#ccc"/>')
        out.append(f'<text x="{x0 + pw / 2}" y="{y0 - 6}" text-anchor="middle">batch {b}</text>')
        for e in range(math.ceil(lx0), math.floor(lx1) + 1):
            out.append(f'<line x1="{X(10**e)}" y1="{y1}" x2="{X(10**e)}" y2="{y1 + 4}" stroke="#999"/>')
            out.append(f'<text x="{X(10**e)}" y="{y1 + 16}" text-anchor="middle">{10**e:g}</text>')
        for e in range(math.ceil(ly0), math.floor(ly1) + 1):
            for m in (1, 2, 5):
                v = m * 10**e
                if ly0 <= math.log10(v) <= ly1:
                    out.append(f'<line x1="{x0}" y1="{Y(v)}" x2="{x0 + pw}" y2="{Y(v)}" stroke="#eee"/>')
                    if i == 0:
                        out.append(f'<text x="{x0 - 6}" y="{Y(v) + 4}" text-anchor="end">{v:g}</text>')
        out.append(f'<text x="{sx}" y="{y1 + 16}" text-anchor="middle">1 node</text>')
        out.append(f'<text x="{x0 + plot_w / 2}" y="{y1 + 32}" text-anchor="middle">'
                   'link Mbit/s each way (log)</text>')
        for l in links:
            out.append(f'<text x="{X(rates[l])}" y="{y0 + 14}" text-anchor="middle" fill="#888" '
                       f'font-size="10">{l}</text>')
        for lay in LAYOUTS:
            c = LAYOUTS[lay][0]
            for k, dash in ((0, ""), (1, ' stroke-dasharray="5,4"')):
                seq = sorted((rates[l], pts[(lay, l, b)][k]) for l in links if (lay, l, b) in pts)
                seq = [(r, v) for r, v in seq if v == v and v > 0]
                if len(seq) > 1:
                    d = " ".join(f"{X(r):.1f},{Y(v):.1f}" for r, v in seq)
                    out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.5"{dash}/>')
                for r, v in seq:
                    fill = c if k == 0 else "white"
                    out.append(f'<circle cx="{X(r):.1f}" cy="{Y(v):.1f}" r="3.5" fill="{fill}" stroke="{c}"/>')
                if (lay, "shm", b) in pts:
                    v = pts[(lay, "shm", b)][k]
                    fill = c if k == 0 else "white"
                    out.append(f'<circle cx="{sx + (k - 0.5) * 10:.1f}" cy="{Y(v):.1f}" r="3.5" '
                               f'fill="{fill}" stroke="{c}"/>')
        if i == 0:
            out.append(f'<text x="{x0 - 45}" y="{(y0 + y1) / 2}" text-anchor="middle" '
                       f'transform="rotate(-90 {x0 - 45} {(y0 + y1) / 2})">ms per step (log)</text>')
    # The legend: bottom left of the batch-8 panel (its steps are the slower ones: the bottom of
    # the shared scale stays empty there), the layouts drawn.
    drawn = [lay for lay in LAYOUTS if any(k[0] == lay for k in pts)]
    lx, y = pad + pw + gap + 10, H - 70 - 12 - 16 * len(drawn)
    for lay in drawn:
        c, name = LAYOUTS[lay]
        y += 16
        out.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 24}" y2="{y}" stroke="{c}" stroke-width="1.5"/>')
        out.append(f'<line x1="{lx + 28}" y1="{y}" x2="{lx + 52}" y2="{y}" stroke="{c}" '
                   'stroke-width="1.5" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{lx + 58}" y="{y + 4}" font-size="11">{name} measured, predicted</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-2])
    sys.stdout.write(draw(*parse(open(sys.argv[1]).read())))
