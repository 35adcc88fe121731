#!/usr/bin/env bash
# `bench prefill` under mpirun, one process per rank: with --pp the prompt pass goes through the
# stages over MPI, with --tp the ranks split each layer; each names its layout and times a prompt.
# Usage: mpi_prefill_check.sh PARALLM MPIRUN "MPIRUN FLAGS" MODEL
set -euo pipefail
bin=$1 mpirun=$2 flags=$3 model=$4
for layout in "--pp 2" "--tp 2"; do
  # shellcheck disable=SC2086
  out=$("$mpirun" $flags -np 2 "$bin" bench prefill --model "$model" --prompt-len 32 --threads 1 \
          --comm-timeout 60 $layout 2>&1) || { echo "$out"; echo "FAIL: $layout exited non-zero"; exit 1; }
  want=$([ "$layout" = "--pp 2" ] && echo "tp 1 x pp 2" || echo "tp 2 x pp 1")
  echo "$out" | grep -qF "$want" || { echo "$out"; echo "FAIL: $layout: no '$want'"; exit 1; }
  ms=$(echo "$out" | awk '/^  ms\/prompt/ {print $2}')
  [ "$(echo "$out" | grep -c '^bench prefill:')" = 1 ] || { echo "$out"; echo "FAIL: not one report"; exit 1; }
  awk -v m="$ms" 'BEGIN { exit !(m > 0) }' || { echo "$out"; echo "FAIL: $layout: ms/prompt '$ms'"; exit 1; }
  echo "bench prefill $layout over MPI: $ms ms a 32-token prompt"
done
