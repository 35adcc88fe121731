#!/usr/bin/env bash
# Measures what the planner needs (comm alpha/beta over MPI, the node's and one rank's decode
# bandwidth) and the TP=2 / PP=2 decode times it predicts, all in one go on this machine, then
# prints the planner's prediction beside them. Usage: scripts/planner-accuracy.sh [MODEL_DIR]
# (default /tmp/tinyllama; make it with: parallm init-model --shape tinyllama-1.1b --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
B=./build/parallm
M=${1:-/tmp/tinyllama}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
comm=$(mktemp --suffix .json)
trap 'rm -f "$comm"' EXIT
achieved() { grep -E '^  achieved' | awk '{print $2}'; }
echo "== comm (MPI, 2 ranks)"
mpirun -np 2 $B bench comm --backend mpi --op all --algo auto --max-bytes 1M --step-factor 4 \
  --json "$comm" | grep -E 'alpha' || true
echo "== decode, TP=1, all cores (the node's rate)"
node=$($B bench decode --model "$M" --tokens 16 | tee /dev/stderr | achieved)
echo "== decode, TP=1, one thread (one rank alone)"
alone=$($B bench decode --model "$M" --tokens 16 --threads 1 | tee /dev/stderr | achieved)
for how in "mpirun -np 2" ""; do
  echo "== decode, TP=2 ${how:-threads}"
  $how $B bench decode --model "$M" --tokens 16 --tp 2 --threads 1 | grep -E 'ms/token|all-reduce'
  echo "== decode, PP=2 ${how:-threads}, batch 1"
  $how $B bench decode --model "$M" --tokens 16 --warmup 2 --pp 2 --threads 1 --batch 1 \
    --micro-batches 1 | grep -E 'ms/step'
done
echo "== plan --mem-bw $node --rank-mem-bw $alone"
$B plan --model "$M/config.json" --gpu cpu --gpus 2 --calibrate "$comm" --mem-bw "$node" \
  --rank-mem-bw "$alone" --dtype bf16 --act-dtype fp32 --batch 1 --prompt-len 1 --output-len 16 |
  grep -E '^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]+ |TPOT'
