#!/usr/bin/env bash
# The training corpus of the README's main job: the King James Bible (public domain), from
# Debian's bible-kjv-text read with the `bible` program of bible-kjv, as plain text, a
# sentencepiece tokenizer trained on it, and the token files `parallm train --data` reads.
#
# Usage: bash scripts/kjv-corpus.sh OUT_DIR [--force]
#   env PARALLM: the parallm binary (default: build/parallm of this checkout)
#   env KJV_VOCAB: vocabulary size (default 2048)
#
# Writes, in OUT_DIR:
#   kjv.txt          the whole text, one verse a line, verse references stripped (31102 lines)
#   kjv-train.txt    the first 98% of the verses; kjv-val.txt: the last 2% (622 verses,
#                    2 Peter 1:1 to Revelation 22:21), held out from the tokenizer and training
#   tokenizer.model  sentencepiece BPE, trained on kjv-train.txt
#   kjv.bin          kjv-train.txt as u16 token ids (BOS first; docs/training.md)
#   kjv-val.bin      kjv-val.txt likewise
# Existing outputs are kept unless --force (or unless one of them is missing).
#
# Why 2048 tokens: on this text BPE at 2048 gives 3.8 bytes per token and at 4096 only 4.2
# (10% fewer tokens for twice the embedding and LM-head rows); the KJV's frequent words are single
# tokens already at 2048, and a small model trained for minutes learns 2048 rows of embedding and
# LM head better than 4096 (each row is seen twice as often), for less compute per token.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

[ $# -ge 1 ] || { echo "usage: bash scripts/kjv-corpus.sh OUT_DIR [--force]" >&2; exit 2; }
out="$1"
force=0
[ "${2:-}" = "--force" ] && force=1
parallm="${PARALLM:-$root/build/parallm}"
vocab="${KJV_VOCAB:-2048}"
if [ ! -x "$parallm" ]; then
  echo "kjv-corpus: $parallm not found; build it first (bash scripts/setup.sh)" >&2
  exit 1
fi

mkdir -p "$out"
if [ $force = 0 ] && [ -s "$out/kjv.bin" ] && [ -s "$out/kjv-val.bin" ] &&
  [ -s "$out/tokenizer.model" ]; then
  echo "kjv-corpus: $out already has kjv.bin, kjv-val.bin and tokenizer.model (--force rebuilds)"
  exit 0
fi

start=$(date +%s%N)
# bible-kjv: the `bible` program; bible-kjv-text: its compressed text (/usr/lib/bible.data).
if ! command -v bible >/dev/null || [ ! -e /usr/lib/bible.data ]; then
  bash "$root/scripts/install-packages.sh" bible-kjv bible-kjv-text
fi

# -f turns pretty-printing off: one verse a line, "Ge1:1 In the beginning...". The range
# Gen1:1-Rev22:21 is the whole book (man bible). The reference (book abbreviation, optionally
# with a leading digit, chapter:verse) is stripped: the model should learn the prose, not the
# numbering.
bible -f Gen1:1-Rev22:21 | sed -E 's/^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ //' > "$out/kjv.txt.tmp"
lines=$(wc -l < "$out/kjv.txt.tmp")
if [ "$lines" -ne 31102 ] || grep -qE '^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ ' "$out/kjv.txt.tmp"; then
  echo "kjv-corpus: expected 31102 verses without references from 'bible', got $lines lines" >&2
  exit 1
fi
mv "$out/kjv.txt.tmp" "$out/kjv.txt"

val=$((lines / 50))  # the last 2% of the verses
head -n $((lines - val)) "$out/kjv.txt" > "$out/kjv-train.txt"
tail -n $val "$out/kjv.txt" > "$out/kjv-val.txt"

"$parallm" tokenizer train --in "$out/kjv-train.txt" --vocab-size "$vocab" --model-type bpe \
  --out "$out/tokenizer.model"
for split in train val; do
  bin="$out/kjv.bin"
  [ $split = val ] && bin="$out/kjv-val.bin"
  "$parallm" tokenize --tokenizer "$out/tokenizer.model" --in "$out/kjv-$split.txt" --out "$bin"
done

ms=$((($(date +%s%N) - start) / 1000000))
printf '%s: kjv.txt %d bytes (%d verses), kjv.bin %d tokens, kjv-val.bin %d tokens (%d verses), ' \
  "kjv-corpus: $out" "$(stat -c %s "$out/kjv.txt")" "$lines" $(($(stat -c %s "$out/kjv.bin") / 2)) \
  $(($(stat -c %s "$out/kjv-val.bin") / 2)) "$val"
printf 'vocabulary %s, in %d.%d s\n' "$vocab" $((ms / 1000)) $((ms % 1000 / 100))
