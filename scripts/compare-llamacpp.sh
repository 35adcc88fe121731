#!/usr/bin/env bash
# parallm against llama.cpp (node-llama-cpp, pinned in bench/llamacpp/package-lock.json) on the
# same GGUF files of a real trained model: the greedy tokens of both engines from a few prompts.
# f32 must agree token for token (exit 1 otherwise); for Q8_0 and Q4_0 the first step where they
# part is printed (both quantize the activations to 8 bits, in different orders of summation: on a
# model this small the top two logits are often within the rounding).
#
# Usage: scripts/compare-llamacpp.sh [N_TOKENS]   (default 32)
# The model is stories260K (models/), written by `parallm quantize`; llama.cpp needs a vocabulary
# with the 256 byte pieces, and stories260K's own tokenizer is not in the repository, so a
# 512-piece byte-fallback tokenizer is trained on the docs: token ids are compared, not text.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PARALLM:-./build/parallm}
N=${1:-32}
[ -x "$P" ] || { echo "compare-llamacpp: $P not built" >&2; exit 1; }
(cd bench/llamacpp && [ -d node_modules/node-llama-cpp ] || npm ci --no-audit --no-fund >/dev/null)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp models/stories260K/stories260K.bin "$work/"
cat docs/*.md > "$work/text.txt"
"$P" tokenizer train --in "$work/text.txt" --vocab-size 512 --byte-fallback --out "$work" >/dev/null
status=0
for type in f32 q8_0 q4_0; do
  "$P" quantize --model "$work/stories260K.bin" --type "$type" --out "$work/$type.gguf" >/dev/null
  for prompt in 1 1,400,300 1,260,300,280,290,500; do
    ours=$("$P" generate --model "$work/$type.gguf" --prompt-ids "$prompt" --max-tokens "$N" \
             --print-ids 2>/dev/null | head -1 | tr -s ' ' ',' | sed 's/,$//')
    theirs=$(cd bench/llamacpp && node greedy.mjs "$work/$type.gguf" "$prompt" "$N")
    same=$(paste -d' ' <(tr ',' '\n' <<<"$ours") <(tr ',' '\n' <<<"$theirs") |
           awk '$1 != $2 {print NR - 1; exit} END {if (NR) print NR}' | head -1)
    if [ "$ours" = "$theirs" ]; then
      echo "$type prompt $prompt: the same $N tokens"
    else
      echo "$type prompt $prompt: first difference at step $same"
      echo "  parallm   $ours"
      echo "  llama.cpp $theirs"
      [ "$type" = f32 ] && status=1
    fi
  done
done
exit $status
