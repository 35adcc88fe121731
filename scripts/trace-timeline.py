#!/usr/bin/env python3
"""Draws the measured pipeline timeline of a `parallm train|bench train --trace FILE` run as SVG.

Usage: scripts/trace-timeline.py TRACE.json OUT.svg --steps K [--title TEXT]

The trace holds K steps (bench train: warm-up + measured steps); the last step is drawn, one row
per rank (pid), its F / B / W compute spans as blocks labelled with their micro-batch, idle time
left blank, and the row's bubble (1 - busy / span of the step) printed at its end. Put it beside
`parallm schedule --svg` of the same schedule with the measured per-stage times
(--stage-forward-times ...) to see measured and predicted bubbles side by side. Standard library
only.
"""
import argparse
import json
import sys

COLOURS = {"F": "#4c78a8", "B": "#f58518", "W": "#e45756", "b": "#f58518"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True, help="steps the trace holds")
    ap.add_argument("--title", default="measured")
    a = ap.parse_args()
    if a.steps < 1:
        sys.exit("trace-timeline: --steps must be >= 1, got %d" % a.steps)
    with open(a.trace) as f:
        data = json.load(f)
    events = data if isinstance(data, list) else data.get("traceEvents", [])
    rows = {}
    for e in events:
        if e.get("cat") != "compute" or e.get("ph") != "X":
            continue
        name = e.get("name", "")
        if not name or name[0] not in "FBW" or not name[1:].split(".")[0].isdigit():
            continue  # layer spans and the like: only the schedule's actions
        rows.setdefault(e["pid"], []).append((e["ts"], e["dur"], name))
    if not rows:
        sys.exit("trace-timeline: %s has no F/B/W compute spans (was --pp > 1?)" % a.trace)
    last = {}
    for pid, spans in rows.items():
        spans.sort()
        if len(spans) % a.steps:
            sys.exit("trace-timeline: rank %d has %d actions, not a multiple of --steps %d"
                     % (pid, len(spans), a.steps))
        last[pid] = spans[-len(spans) // a.steps:]
    t0 = min(s[0][0] for s in last.values())
    t1 = max(s[-1][0] + s[-1][1] for s in last.values())
    width, row_h, left = 900.0, 28, 70
    scale = width / max(t1 - t0, 1e-9)
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="monospace" '
           'font-size="11">' % (left + width + 90, 40 + row_h * len(last))]
    out.append('<text x="4" y="16">%s: last of %d steps, %.1f ms</text>'
               % (a.title, a.steps, (t1 - t0) / 1000))
    for i, pid in enumerate(sorted(last)):
        y = 28 + i * row_h
        out.append('<text x="4" y="%d">stage %d</text>' % (y + 16, pid))
        busy = 0.0
        for ts, dur, name in last[pid]:
            busy += dur
            x = left + (ts - t0) * scale
            w = max(dur * scale, 0.5)
            out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" stroke="white" '
                       'stroke-width="0.5"/>' % (x, y, w, row_h - 6, COLOURS.get(name[0], "#999")))
            if w > 14:
                out.append('<text x="%.1f" y="%d" fill="white">%s</text>' % (x + 2, y + 15, name))
        out.append('<text x="%d" y="%d">idle %.2f</text>'
                   % (left + width + 6, y + 16, 1 - busy / max(t1 - t0, 1e-9)))
    out.append("</svg>")
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
