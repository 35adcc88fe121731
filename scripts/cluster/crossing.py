"""The link rate below which PP=2 beats TP=2, from (rate, TP ms, PP ms) points: log-linear in the
rate between the two neighbouring rates where log(TP/PP) changes sign, from the fastest rate down.
Shared by grid_summary.py (a grid's own crossovers) and grid_replan.py (recorded grids', measured
and re-predicted, and pooled over several grids)."""
import math


def crossing(series):
    """[(mbit, tp_ms, pp_ms)] -> ("at", X) | ("pp", fastest rate) | ("tp", slowest rate) | None:
    the crossover at X Mbit/s, PP faster at every rate, TP faster at every rate, or no points."""
    s = sorted(series, reverse=True)
    if not s:
        return None
    if s[0][1] >= s[0][2]:
        return ("pp", s[0][0])
    for (r1, t1, p1), (r2, t2, p2) in zip(s, s[1:]):
        d1, d2 = math.log(t1 / p1), math.log(t2 / p2)
        if d1 < 0 <= d2:
            f = d1 / (d1 - d2)
            return ("at", math.exp(math.log(r1) + f * (math.log(r2) - math.log(r1))))
    return ("tp", s[-1][0])


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
