#!/usr/bin/env bash
# Training throughput, parallm against PyTorch 1.13 (Debian's python3-torch on /usr/bin/python3),
# on the same model, weights, data order, thread count and batch, f32, run alternately so that the
# machine's drift hits both sides alike (issue 11's performance goals):
#   1. one rank, THREADS threads: `parallm bench train` vs tests/reference/bench_train_torch.py
#      (an ordinary PyTorch loop: forward, cross-entropy, backward, clip_grad_norm_, AdamW);
#      goal: parallm >= 1.2x PyTorch's tokens/s.
#   2. data parallelism: DP=2 as two MPI processes of one thread each vs one process of 2 threads;
#      goal: >= 0.9x.
# The model (config below): hidden 512, 8 layers, 8 heads of 64 (8 KV heads), FFN 1376, vocab 8192,
# untied head: 33.7M parameters (parallm bench train's default shape, bench-30m). Batch: GLOBAL
# sequences of SEQ tokens per step, in micro-batches of MICRO (gradient accumulation).
#
# Usage: scripts/bench-train-vs-torch.sh   (env: THREADS=2 SEQ=128 MICRO=2 GLOBAL=4 STEPS=3
#        WARMUP=1 RUNS=3 PARALLM=./build/parallm OMP_WAIT_POLICY=PASSIVE DP_COMPARE=1 (0: the
#        one-rank comparison only); build with --target parallm_bin first)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${PARALLM:-./build/parallm}
PY=/usr/bin/python3
THREADS=${THREADS:-2} SEQ=${SEQ:-128} MICRO=${MICRO:-2} GLOBAL=${GLOBAL:-4}
STEPS=${STEPS:-3} WARMUP=${WARMUP:-1} RUNS=${RUNS:-3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=$THREADS
# PyTorch's OpenMP threads spin while they wait by default; on a machine shared with other work
# that costs it up to 6x at 2 threads (measured on the 2-core build machine: 13 vs 53 tokens/s),
# so give it the passive policy unless told otherwise. parallm does not use OpenMP.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

[ -x "$B" ] || { echo "no parallm binary at $B (cmake --build build --target parallm_bin)"; exit 1; }
$PY -c 'import torch, numpy' 2>/dev/null || { echo "$PY lacks torch/numpy: no PyTorch side"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/config.json" <<'EOF'
{"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
 "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8192,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "tie_word_embeddings": false, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
 "hidden_act": "silu"}
EOF
$B init-model --shape "$work/config.json" --dtype f32 --seed 1 --out "$work/model"
# Uniform random ids: enough for every step without wrapping.
$PY -c "import numpy as np; np.random.default_rng(0).integers(0, 8192, size=$(( (WARMUP + STEPS) * GLOBAL * SEQ + 1 ))).astype('<u2').tofile('$work/data.bin')"

# Both sides: the same weights, batch layout and steps; parallm's bench draws its own uniform
# random ids (it takes no --data), PyTorch reads the same distribution from a file.
common="--model $work/model --seq-len $SEQ --micro-batch-size $MICRO --global-batch-size $GLOBAL --steps $STEPS"
# The last number printed beside "tokens/s" (the run's summary, after any per-step lines).
tps() { grep -oE '[0-9]+(\.[0-9]+)? tokens/s|tokens/s[:= ]+[0-9]+(\.[0-9]+)?' | tail -1 | grep -oE '[0-9]+(\.[0-9]+)?' || echo 0; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

have_bench=1
if ! $B bench --help 2>&1 | grep -qE '^ +train +'; then
  have_bench=0
  echo "note: this parallm build has no 'bench train' command; measuring the PyTorch side only"
fi

run_parallm() {  # extra flags...; prints tokens/s
  local out
  if ! out=$("$@" 2>&1); then echo "$out" >&2; echo 0; return; fi
  echo "$out" | tps
}

echo "== one rank, $THREADS threads, batch $GLOBAL x $SEQ (micro-batch $MICRO), f32"
printf '%-5s %14s %14s %8s\n' run parallm torch ratio
P=() T=()
for r in $(seq 1 "$RUNS"); do
  p=-
  if [ $have_bench = 1 ]; then
    p=$(run_parallm $B bench train $common --warmup "$WARMUP" --threads "$THREADS")
  fi
  t=$($PY tests/reference/bench_train_torch.py $common --data "$work/data.bin" --warmup "$WARMUP" --threads "$THREADS" | tps)
  P+=("$p") T+=("$t")
  printf '%-5s %14s %14s %8s\n' "$r" "$p" "$t" "$(ratio "$p" "$t")"
done
pm=$(median "${P[@]}") tm=$(median "${T[@]}")
printf '%-5s %14s %14s %8s   (ratio of the medians; goal: >= 1.2)\n' median "$pm" "$tm" "$(ratio "$pm" "$tm")"

[ "${DP_COMPARE:-1}" = 0 ] && exit 0
echo "== data parallelism: DP=2 as 2 MPI processes x 1 thread vs 1 process x 2 threads"
if [ $have_bench = 0 ]; then
  echo "skipped: needs 'parallm bench train'"
  exit 0
fi
if ! command -v mpirun > /dev/null; then
  echo "skipped: no mpirun"
  exit 0
fi
printf '%-5s %14s %14s %8s\n' run dp2-mpi threads2 ratio
D=() O=()
for r in $(seq 1 "$RUNS"); do
  d=$(run_parallm mpirun --allow-run-as-root --oversubscribe -np 2 $B bench train $common \
    --warmup "$WARMUP" --dp 2 --threads 1)
  o=$(run_parallm $B bench train $common --warmup "$WARMUP" --threads 2)
  D+=("$d") O+=("$o")
  printf '%-5s %14s %14s %8s\n' "$r" "$d" "$o" "$(ratio "$d" "$o")"
done
dm=$(median "${D[@]}") om=$(median "${O[@]}")
printf '%-5s %14s %14s %8s   (ratio of the medians; goal: >= 0.9)\n' median "$dm" "$om" "$(ratio "$dm" "$om")"
