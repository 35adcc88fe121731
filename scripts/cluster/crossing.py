"""The link rate below which PP=2 beats TP=2, from (rate, TP ms, PP ms) points: log-linear in the
rate between the two neighbouring rates where log(TP/PP) changes sign, from the fastest rate down.
Shared by grid_summary.py (a grid's own crossovers), grid_replan.py (recorded grids', measured
and re-predicted, and pooled over several grids) and crossover_summary.py (the paired search's
median log ratios)."""
import math


def crossing_log(pts):
    """[(mbit, log(tp_ms / pp_ms))] -> ("at", X) | ("pp", fastest rate) | ("tp", slowest rate) |
    None: the crossover at X Mbit/s, PP faster at every rate, TP faster at every rate, no points."""
    s = sorted(pts, reverse=True)
    if not s:
        return None
    if s[0][1] >= 0:
        return ("pp", s[0][0])
    for (r1, d1), (r2, d2) in zip(s, s[1:]):
        if d1 < 0 <= d2:
            f = d1 / (d1 - d2)
            return ("at", math.exp(math.log(r1) + f * (math.log(r2) - math.log(r1))))
    return ("tp", s[-1][0])


def crossing(series):
    """[(mbit, tp_ms, pp_ms)] -> crossing_log() of their log ratios."""
    return crossing_log([(r, math.log(t / p)) for r, t, p in series])


def describe(series):
    """crossing() in words: "X Mbit/s", or which layout is faster at every rate, or "n/a"."""
    c = crossing(series)
    if c is None:
        return "n/a"
    kind, r = c
    if kind == "pp":
        return "PP faster at every rate (>= %g Mbit/s)" % r
    if kind == "tp":
        return "TP faster at every rate (down to %g Mbit/s)" % r
    return "%.1f Mbit/s" % r
