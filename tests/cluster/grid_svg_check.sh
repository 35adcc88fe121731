#!/usr/bin/env bash
# scripts/cluster/grid_svg.py draws a grid's output: every measured point a filled dot and every
# predicted one a ring, both layouts' curves at both batches; input without grid points is
# refused with one line. Usage: grid_svg_check.sh (no arguments; needs /usr/bin/python3).
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
draw=$src/scripts/cluster/grid_svg.py
fixture=$src/tests/fixtures/cluster-grid.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A grid of TP=2 and PP=2 (2026-12-01), and one with TP=2 x PP=2's two placements too
# (2026-12-03): 2 or 4 layouts x two batches x (measured, predicted), each a curve over the links.
check() {  # FIXTURE CURVES
/usr/bin/python3 "$draw" "$1" >"$tmp/grid.svg"
points=$(grep -cE '^(tp2|pp2|tp2pp2-tpin|tp2pp2-tpx) +[^ ]+ +[18] ' "$1")  # decode points (prefill: batch pN)
/usr/bin/python3 - "$tmp/grid.svg" "$points" "$2" <<'PY'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
ns = "{http://www.w3.org/2000/svg}"
assert root.tag == ns + "svg", root.tag
circles = root.findall(f".//{ns}circle")
filled = [c for c in circles if c.get("fill") != "white"]
rings = [c for c in circles if c.get("fill") == "white"]
n = int(sys.argv[2])
assert len(filled) == n and len(rings) == n, f"{len(filled)} dots, {len(rings)} rings for {n} points"
lines = root.findall(f".//{ns}polyline")
assert len(lines) == int(sys.argv[3]), f"{len(lines)} curves"
texts = " ".join(t.text or "" for t in root.findall(f".//{ns}text"))
wants = ["batch 1", "batch 8", "1 node", "TP=2 measured", "PP=2 measured", "eth"]
if len(lines) == 16:
    wants += ["TP=2 x PP=2, TP in a node measured", "TP=2 x PP=2, TP across measured"]
for want in wants:
    assert want in texts, f"no '{want}' in the drawing"
print(f"grid_svg.py: {n} points drawn as {len(filled)} dots and {len(rings)} rings, {len(lines)} curves")
PY
}
check "$fixture" 8
check "$src/tests/fixtures/cluster-grid-shared-cores.txt" 16
printf '# nothing measured\n' >"$tmp/empty.txt"
if /usr/bin/python3 "$draw" "$tmp/empty.txt" >"$tmp/out" 2>"$tmp/err"; then
  echo "FAIL: grid_svg.py accepted input without grid points"; exit 1
fi
grep -q "no grid points" "$tmp/err" || { cat "$tmp/err"; echo "FAIL: no clear message"; exit 1; }
echo "grid svg check passed"
