#!/usr/bin/env bash
# parallm against llama.cpp (node-llama-cpp, pinned in bench/llamacpp/package-lock.json) on the
# same GGUF files of a real trained model: the greedy tokens of both engines from a few prompts.
# f32 must agree token for token (exit 1 otherwise); for Q8_0 and Q4_0 the first step where they
# part is printed (both quantize the activations to 8 bits, in different orders of summation: on a
# model this small the top two logits are often within the rounding).
#
# Usage: scripts/compare-llamacpp.sh [N_TOKENS]   (default 32; MODELS="stories260K mixtral llama256")
# The models are stories260K (models/), a random Mixtral-shaped MoE and a random LLaMA of hidden
# 256 (llama256: whole 256-value rows, so its matrices take the K types q4_k, q5_k, q6_k, q4_k_m
# and q5_k_m; stories260K's and the MoE's rows fall back to Q8_0 there), written by `parallm
# quantize`; llama.cpp needs a vocabulary
# with the 256 byte pieces, and stories260K's own tokenizer is not in the repository, so a
# 512-piece byte-fallback tokenizer is trained on the docs: token ids are compared, not text.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PARALLM:-./build/parallm}
N=${1:-32}
[ -x "$P" ] || { echo "compare-llamacpp: $P not built" >&2; exit 1; }
# npm 11 refuses `npm ci` here (the lock file has no entries for other platforms' optional builds);
# `npm install` then installs the same pinned versions from the lock file.
(cd bench/llamacpp && [ -d node_modules/node-llama-cpp ] || npm ci --no-audit --no-fund >/dev/null 2>&1 ||
  npm install --no-audit --no-fund >/dev/null)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp models/stories260K/stories260K.bin "$work/"
cat docs/*.md > "$work/text.txt"
"$P" tokenizer train --in "$work/text.txt" --vocab-size 512 --byte-fallback --out "$work" >/dev/null
# A Mixtral-shaped MoE model (random weights, 8 experts, top 2, hidden 128) with the same
# tokenizer, written as llama.cpp writes Mixtral: the llama architecture with stacked
# ffn_*_exps experts and an f32 ffn_gate_inp router.
"$P" init-model --shape mixtral-tiny --out "$work/mix-base" >/dev/null
sed -e 's/"vocab_size": [0-9]*/"vocab_size": 512/' -e 's/"hidden_size": [0-9]*/"hidden_size": 128/' \
  -e 's/"intermediate_size": [0-9]*/"intermediate_size": 128/' "$work/mix-base/config.json" \
  > "$work/mix.json"
"$P" init-model --shape "$work/mix.json" --dtype f32 --seed 3 --out "$work/mix" >/dev/null
cp "$work/tokenizer.model" "$work/mix/"
# llama256: 4 layers, hidden 256, FFN 512, 8 heads over 4 KV heads, vocab 512.
"$P" init-model --shape small --out "$work/small" >/dev/null
sed -e 's/"vocab_size": [0-9]*/"vocab_size": 512/' \
  -e 's/"intermediate_size": [0-9]*/"intermediate_size": 512/' "$work/small/config.json" \
  > "$work/l256.json"
"$P" init-model --shape "$work/l256.json" --dtype f32 --seed 5 --out "$work/l256" >/dev/null
cp "$work/tokenizer.model" "$work/l256/"
status=0
for model in ${MODELS:-stories260K mixtral llama256}; do
types="f32 q8_0 q4_0"
[ "$model" = llama256 ] && types="f32 q4_k q5_k q6_k q4_k_m q5_k_m"
for type in $types; do
  src="$work/stories260K.bin"
  [ "$model" = mixtral ] && src="$work/mix"
  [ "$model" = llama256 ] && src="$work/l256"
  "$P" quantize --model "$src" --type "$type" --out "$work/$type.gguf" >/dev/null
  for prompt in 1 1,400,300 1,260,300,280,290,500; do
    # --dtype f32: parallm reads a GGUF's unquantized matrices as bf16 by default (--dtype auto);
    # llama.cpp computes them in f32.
    ours=$("$P" generate --model "$work/$type.gguf" --prompt-ids "$prompt" --max-tokens "$N" \
             --dtype f32 --print-ids 2>/dev/null | head -1 | tr -s ' ' ',' | sed 's/,$//')
    theirs=$(cd bench/llamacpp && node greedy.mjs "$work/$type.gguf" "$prompt" "$N")
    same=$(paste -d' ' <(tr ',' '\n' <<<"$ours") <(tr ',' '\n' <<<"$theirs") |
           awk '$1 != $2 {print NR - 1; exit} END {if (NR) print NR}' | head -1)
    if [ "$ours" = "$theirs" ]; then
      echo "$model $type prompt $prompt: the same $N tokens"
    else
      echo "$model $type prompt $prompt: first difference at step $same"
      echo "  parallm   $ours"
      echo "  llama.cpp $theirs"
      [ "$type" = f32 ] && status=1
    fi
  done
done
done
exit $status
