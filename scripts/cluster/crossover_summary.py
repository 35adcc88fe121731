#!/usr/bin/python3
"""The crossover of `emulate-cluster.sh grid --crossover BATCH` (scripts/cluster/crossover.sh) from
its rates' lines: "MBIT MEDIAN_LOG_RATIO TP_FASTER PAIRS PRED_LOG_RATIO" (log of TP=2's over PP=2's
ms a step: above 0 PP=2 is the faster).

Measured: where the median log ratio crosses 0 between the two rates that bracket it most closely
(log-linear in the rate, as grid_summary.py reads the grid's), and the range the pairs decide: from
the fastest rate at which PP=2 won at least 80% of its pairs to the slowest at which TP=2 did.
Predicted: the same crossing of the planner's log ratios over the same rates, with one set of
compute rates at every rate (POOLED_FILE: "MBIT TP_MS PP_MS"), and with each rate's own (the
one-rank runs beside its pairs). Then the measured over the predicted.

Usage: crossover_summary.py XO_FILE BATCH POOLED_FILE
"""
import math
import sys

from crossing import crossing_log  # beside this script


def crossing(pts):  # [(mbit, log_ratio)] -> mbit where it goes through 0, or a bound as text
    c = crossing_log(pts)  # fastest link first: TP=2 the faster there (ratio < 0)
    if c is None:
        return None, "n/a (no rates)"
    if c[0] == "pp":
        return None, "PP=2 faster at every rate searched (>= %g Mbit/s)" % c[1]
    if c[0] == "tp":
        return None, "TP=2 faster at every rate searched (down to %g Mbit/s)" % c[1]
    return c[1], "%.0f Mbit/s" % c[1]


rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
if not rows:
    sys.exit("crossover_summary.py: %s: no rates measured" % sys.argv[1])
batch = sys.argv[2]
pts = [(float(r[0]), float(r[1]), int(r[2]), int(r[3]), float(r[4])) for r in rows]
meas, meas_txt = crossing([(r, d) for r, d, _, _, _ in pts])
pooled = [l.split() for l in open(sys.argv[3]) if l.strip()]
pred, pred_txt = crossing([(float(r), math.log(float(t) / float(p))) for r, t, p in pooled])
own, own_txt = crossing([(r, p) for r, _, _, _, p in pts])
# The range the pairs decide: PP=2 the faster in >= 80% of a rate's pairs below, TP=2 above.
pp_won = [r for r, _, tp, n, _ in pts if n - tp >= 0.8 * n]
tp_won = [r for r, _, tp, n, _ in pts if tp >= 0.8 * n]
lo = max(pp_won) if pp_won else None
hi = min((r for r in tp_won if lo is None or r > lo), default=None)
decided = ("%g to %g Mbit/s" % (lo, hi) if lo and hi else "above %g Mbit/s" % lo if lo else
           "below %g Mbit/s" % hi if hi else "no rate: none had 80% of its pairs one way")
line = "crossover batch %s (paired search over %d rates): measured %s (the pairs decide %s), predicted %s" % (
    batch, len(pts), meas_txt, decided, pred_txt)
if meas and pred:
    line += ", measured/predicted %.2fx" % (meas / pred)
line += "; predicted with each rate's own compute rates %s" % own_txt
if meas and own:
    line += " (%.2fx)" % (meas / own)
print(line)
