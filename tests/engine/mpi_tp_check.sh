#!/usr/bin/env bash
# Parallel layouts under MPI, one process per rank: `mpirun -np N parallm generate LAYOUT` gives the
# same greedy tokens as one rank, and logits within 1e-5 relative (f32).
# Usage: mpi_tp_check.sh PARALLM MPIRUN "MPI FLAGS" NP MODEL_OR_SHAPE STEPS [LAYOUT FLAGS]
# LAYOUT defaults to "--tp NP" (one prompt); with --pp or --ep the run is a batch of three prompts.
# MODEL_OR_SHAPE "tiny", "mixtral-tiny" or "qwen2-moe-tiny" makes a random model of that shape.
set -euo pipefail
bin=$1 mpirun=$2 flags=$3 np=$4 model=$5 steps=$6 layout=${7:-"--tp $4"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "$model" = tiny ] || [ "$model" = mixtral-tiny ] || [ "$model" = qwen2-moe-tiny ]; then
  "$bin" init-model --shape "$model" --seed 9 --dtype f32 --out "$tmp/$model" >/dev/null
  model=$tmp/$model
fi
printf '1,7,11\n1\n1,100,5,9\n' >"$tmp/prompts.txt"
prompt=(--prompt-ids 1,7,11)
single=()
case "$layout" in *--pp*|*--ep*) prompt=(--prompts-file "$tmp/prompts.txt") single=(--micro-batches 1) ;; esac
args=(generate --model "$model" "${prompt[@]}" --max-tokens "$steps" --print-ids --print-logits --ignore-eos --threads 1 --comm-timeout 60)
"$bin" "${args[@]}" "${single[@]}" >"$tmp/one.txt" 2>/dev/null
# shellcheck disable=SC2086
"$mpirun" $flags -np "$np" "$bin" "${args[@]}" $layout >"$tmp/mpi.txt" 2>"$tmp/mpi.err" || { cat "$tmp/mpi.err"; exit 1; }
python3 - "$tmp/one.txt" "$tmp/mpi.txt" <<'PY'
import sys
def read(p):
    lines = open(p).read().split("\n")
    tokens = [l.split() for l in lines if l and l[0] in "[0123456789" and not l.startswith("logits")]
    logits = [[float(v) for v in l.split(":", 1)[1].split()] for l in lines if l.startswith("logits[")]
    return tokens, logits
t1, l1 = read(sys.argv[1]); t2, l2 = read(sys.argv[2])
assert t1 == t2, f"tokens differ:\n one rank: {t1}\n mpi:      {t2}"
assert len(l1) == len(l2) and l1, "logit rows missing"
worst = max(max(abs(a - b) for a, b in zip(r1, r2)) / max(abs(b) for b in r1) for r1, r2 in zip(l1, l2))
assert worst < 1e-5, f"logits differ by {worst:.3g} relative"
print(f"mpi tp check passed: {len(t1)} tokens identical, max relative logit difference {worst:.3g}")
PY
