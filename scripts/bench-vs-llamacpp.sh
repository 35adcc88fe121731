#!/usr/bin/env bash
# parallm against llama.cpp on the same GGUF files, same thread count, run alternately: decode
# tokens/s (batch 1, greedy, from a 1-token prompt) and prompt tokens/s (PROMPT tokens in one
# batch), per weight type. llama.cpp is node-llama-cpp's prebuilt CPU build (the version pinned in
# bench/llamacpp/package-lock.json), which picks its best kernels for this CPU at load time.
#
# Usage: scripts/bench-vs-llamacpp.sh [MODEL_DIR]
#   MODEL_DIR: a Hugging Face LLaMA directory with a sentencepiece tokenizer.model (llama.cpp wants
#   a vocabulary with the 256 byte pieces). Default: the TinyLlama-1.1B shape with a 2048-token
#   vocabulary and random weights (bench/configs/tinyllama-vocab2048.json), written once to
#   $WORK/model with a byte-fallback tokenizer trained on this repository's docs.
# Environment: TYPES (default "bf16 q8_0 q4_0 q4_k"), THREADS (default: all cores), ROUNDS (3),
#   PROMPT (512), DECODE (64), WORK (default /tmp/parallm-vs-llamacpp: models and GGUF files),
#   PARALLM (default ./build/parallm), KEEP_OPENBLAS_CORETYPE (1: keep the environment's pin).
# Prints one line per run and, per type, the medians and the ratio parallm / llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
P=${PARALLM:-./build/parallm}
TYPES=${TYPES:-bf16 q8_0 q4_0 q4_k}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-3}
PROMPT=${PROMPT:-512}
DECODE=${DECODE:-64}
WORK=${WORK:-/tmp/parallm-vs-llamacpp}
[ -x "$P" ] || { echo "bench-vs-llamacpp: $P not built (bash scripts/setup.sh, or PARALLM=...)" >&2; exit 1; }
command -v node >/dev/null && command -v npm >/dev/null ||
  { echo "bench-vs-llamacpp: needs node and npm (bash scripts/install-packages.sh nodejs npm)" >&2; exit 1; }
mkdir -p "$WORK"

echo "== llama.cpp: node-llama-cpp from bench/llamacpp/package-lock.json"
# npm 11 refuses `npm ci` here (the lock file has no entries for other platforms' optional builds);
# `npm install` then installs the same pinned versions from the lock file.
(cd bench/llamacpp && [ -d node_modules/node-llama-cpp ] || npm ci --no-audit --no-fund >/dev/null 2>&1 ||
  npm install --no-audit --no-fund >/dev/null)
nlc_version=$(node -p "require('$root/bench/llamacpp/node_modules/node-llama-cpp/package.json').version")

model=${1:-}
if [ -z "$model" ]; then
  model=$WORK/model
  if [ ! -f "$model/tokenizer.model" ]; then
    echo "== model: tinyllama-vocab2048 shape, random weights, byte-fallback tokenizer -> $model"
    "$P" init-model --shape bench/configs/tinyllama-vocab2048.json --out "$model" >/dev/null
    cat docs/*.md README.md > "$WORK/tokenizer-text.txt"
    "$P" tokenizer train --in "$WORK/tokenizer-text.txt" --vocab-size 2048 --byte-fallback \
      --out "$model" >/dev/null
  fi
fi
[ -f "$model/tokenizer.model" ] || { echo "bench-vs-llamacpp: $model/tokenizer.model: missing" >&2; exit 1; }

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
field() { sed -n "s/.*\"$1\": *\([0-9.eE+-]*\).*/\1/p"; }

cpu=$(lscpu | sed -n 's/^Model name: *//p')
simd=$(grep -o -w -E 'avx512_bf16|avx512_vnni|avx_vnni|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "== $cpu; $simd; $THREADS threads; prompt $PROMPT; decode $DECODE; $ROUNDS rounds, alternating"
# OpenBLAS (parallm's prefill where no bf16/int8 GEMM of its own runs: f32 weights, and every
# dtype below AVX-512) picks its kernels for this CPU unless OPENBLAS_CORETYPE pins them, and
# some environments pin an older core (seen: Haswell, AVX2, on a Zen 5). Both engines then choose
# their own kernels: the pin is dropped unless KEEP_OPENBLAS_CORETYPE=1.
if [ -n "${OPENBLAS_CORETYPE:-}" ] && [ "${KEEP_OPENBLAS_CORETYPE:-0}" != 1 ]; then
  echo "== OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE in the environment: unset for these runs"
  unset OPENBLAS_CORETYPE
fi
echo "== parallm's prefill kernels: $("$P" bench prefill --model "$model" --prompt-len 64 --threads 1 2>/dev/null | sed -n 's/^ *kernels *//p')"
echo "== parallm $(git rev-parse --short HEAD 2>/dev/null || echo '?'), llama.cpp via node-llama-cpp $nlc_version"
summary=()
for type in $TYPES; do
  gguf=$WORK/model-$type.gguf
  [ -f "$gguf" ] || "$P" quantize --model "$model" --type "$type" --out "$gguf" | tail -1
  pd=(); pp=(); ld=(); lp=()
  for r in $(seq "$ROUNDS"); do
    d=$("$P" bench decode --model "$gguf" --threads "$THREADS" --tokens "$DECODE" --warmup 4 \
        --bandwidth 1 | awk '/tokens\/s/ {print $2; exit}')
    p=$("$P" bench prefill --model "$gguf" --threads "$THREADS" --prompt-len "$PROMPT" |
        awk '/prompt tokens\/s/ {print $3; exit}')
    l=$(cd bench/llamacpp && node bench.mjs "$gguf" "$THREADS" "$PROMPT" "$DECODE")
    pd+=("$d"); pp+=("$p"); ld+=("$(echo "$l" | field decode_tok_s)"); lp+=("$(echo "$l" | field prompt_tok_s)")
    printf '%-5s round %d  parallm decode %7.2f prompt %7.2f | llama.cpp decode %7.2f prompt %7.2f tok/s\n' \
      "$type" "$r" "$d" "$p" "${ld[-1]}" "${lp[-1]}"
  done
  md=$(printf '%s\n' "${pd[@]}" | median); mp=$(printf '%s\n' "${pp[@]}" | median)
  mld=$(printf '%s\n' "${ld[@]}" | median); mlp=$(printf '%s\n' "${lp[@]}" | median)
  summary+=("$(printf '| %-5s | %7.2f | %7.2f | **%.2fx** | %7.2f | %7.2f | **%.2fx** |' "$type" \
    "$md" "$mld" "$(echo "$md / $mld" | bc -l)" "$mp" "$mlp" "$(echo "$mp / $mlp" | bc -l)")")
done
echo
echo "| type | parallm decode tok/s | llama.cpp decode tok/s | ratio | parallm prompt tok/s | llama.cpp prompt tok/s | ratio |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${summary[@]}"
