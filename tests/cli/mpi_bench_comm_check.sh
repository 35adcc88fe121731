#!/usr/bin/env bash
# `bench comm` under mpirun, one process per rank: the arrival-skew probe gathers every rank's
# slice times over MPI, and rank 0 alone prints the line and writes "arrival_skew" to the JSON (the
# planner's calibration): the world's size, and shares above 0 (processes never tie to the
# nanosecond). At 2 processes on 2 or more cores the share is also below 1; at 3 (oversubscribed on
# a 2-core machine, a rank can wait a whole slice for a core) only the count and sign are checked.
# Then --load 1 at 2 processes: the loaded rows, and "beside_compute" (the loaded all-reduce's fit
# and the share of its speed the computing kept, the slowest process's) in the JSON.
# Then --share-probe 2 at 4 processes (below).
# Usage: mpi_bench_comm_check.sh PARALLM MPIRUN "MPIRUN FLAGS"
set -euo pipefail
bin=$1 mpirun=$2 flags=$3
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for np in 2 3; do
  # shellcheck disable=SC2086
  out=$("$mpirun" $flags -np "$np" "$bin" bench comm --op sendrecv --min-bytes 1K --max-bytes 2K \
          --skew-rounds 6 --comm-timeout 60 --json "$dir/comm$np.json" 2>&1) ||
    { echo "$out"; echo "FAIL: np $np exited non-zero"; exit 1; }
  [ "$(echo "$out" | grep -c "^# arrival skew ($np ranks, 6 rounds")" = 1 ] ||
    { echo "$out"; echo "FAIL: np $np: not one arrival-skew line for $np ranks"; exit 1; }
  upper=$([ "$np" = 2 ] && [ "$(nproc)" -ge 2 ] && echo 1 || echo inf)
  /usr/bin/python3 - "$dir/comm$np.json" "$np" "$upper" <<'PY' || { echo "$out"; exit 1; }
import json, math, sys
j = json.load(open(sys.argv[1]))
np_, upper = int(sys.argv[2]), float(sys.argv[3])
sk = j.get("arrival_skew")
assert sk is not None, f"FAIL: no arrival_skew in {j}"
assert j["backend"] == "mpi" and sk["ranks"] == np_, f"FAIL: backend/ranks {j}"
for kind in ("stream", "compute"):
    v = sk[kind]
    assert math.isfinite(v) and 0 < v < upper, f"FAIL: {kind} share {v} not in (0, {upper})"
    assert sk[kind + "_ms"] > 0.05, f"FAIL: {kind} slice {sk[kind + '_ms']} ms"
print(f"np {np_}: stream {sk['stream']:.3f}, compute {sk['compute']:.3f}")
PY
done
# shellcheck disable=SC2086
out=$("$mpirun" $flags -np 2 "$bin" bench comm --op all_reduce --min-bytes 64K --max-bytes 256K \
        --iters 3 --skew-rounds 0 --load 1 --comm-timeout 60 --json "$dir/load.json" 2>&1) ||
  { echo "$out"; echo "FAIL: --load exited non-zero"; exit 1; }
[ "$(echo "$out" | awk '$1 == "all_reduce" && $4 == "loaded"' | wc -l)" = 3 ] ||
  { echo "$out"; echo "FAIL: --load: not 3 loaded rows"; exit 1; }
/usr/bin/python3 - "$dir/load.json" <<'PY' || { echo "$out"; exit 1; }
import json, sys
j = json.load(open(sys.argv[1]))
bc = j.get("beside_compute")
assert j["backend"] == "mpi" and bc is not None, f"FAIL: {j}"
assert bc["threads"] == 1 and 0 < bc["compute_speed"] <= 1, f"FAIL: beside_compute {bc}"
assert bc["ops"]["all_reduce"]["beta_gbps"] > 0, f"FAIL: beside_compute {bc}"
print(f"--load 1: the computing kept {bc['compute_speed']:.2f}, loaded all_reduce {bc['ops']['all_reduce']}")
PY
# --share-probe 2 at 4 processes: two groups of 2 over MPI sub-communicators, rank 0 alone writing
# "core_sharing" (both groups' times, and an efficiency in (0, 1] the planner accepts).
# shellcheck disable=SC2086
out=$("$mpirun" $flags -np 4 "$bin" bench comm --op all_reduce --min-bytes 4K --max-bytes 8K \
        --iters 3 --skew-rounds 0 --share-probe 2 --share-cores 2 --comm-timeout 60 \
        --json "$dir/share.json" 2>&1) ||
  { echo "$out"; echo "FAIL: --share-probe exited non-zero"; exit 1; }
[ "$(echo "$out" | grep -c "^# core sharing (2 groups of 2 ranks on 2 cores")" = 1 ] ||
  { echo "$out"; echo "FAIL: --share-probe: not one core-sharing line"; exit 1; }
/usr/bin/python3 - "$dir/share.json" <<'PY' || { echo "$out"; exit 1; }
import json, sys
j = json.load(open(sys.argv[1]))
cs = j.get("core_sharing")
assert j["backend"] == "mpi" and cs is not None, f"FAIL: {j}"
assert cs["groups"] == 2 and cs["group_size"] == 2, f"FAIL: core_sharing {cs}"
assert cs["alone_ms"] > 0 and cs["together_ms"] > 0 and 0 < cs["efficiency"] <= 1, f"FAIL: {cs}"
print(f"--share-probe 2: efficiency {cs['efficiency']:.2f}")
PY
