#!/usr/bin/env bash
# Mixture-of-experts training under MPI, one process per rank: `mpirun -np N parallm train LAYOUT`
# with --ep gives the LM and load-balancing losses of one rank (threads, same flags) within 1e-5
# relative at every step, and its checkpoint loads into generate.
# Usage: mpi_moe_train_check.sh PARALLM MPIRUN "MPI FLAGS" NP "LAYOUT FLAGS"
set -euo pipefail
bin=$1 mpirun=$2 flags=$3 np=$4 layout=$5
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# tests/train/moe_train_test.cpp's tiny_moe: 4 experts top-2 (EP 3 holds 2, 1, 1), FFN 24 for TP 2.
cat >"$tmp/config.json" <<'JSON'
{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 32,
 "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64, "max_position_embeddings": 64,
 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "num_local_experts": 4,
 "num_experts_per_tok": 2, "router_aux_loss_coef": 0.01}
JSON
python3 - "$tmp/data.bin" <<'PY'
import random, struct, sys
r = random.Random(5)
ids = [(r.randrange(64) * r.randrange(64)) // 64 for _ in range(3000)]
open(sys.argv[1], "wb").write(struct.pack("<%dH" % len(ids), *ids))
PY
args=(train --init "$tmp/config.json" --seed 3 --data "$tmp/data.bin" --seq-len 8
      --micro-batch-size 1 --global-batch-size 12 --steps 10 --lr 1e-2 --min-lr 1e-3
      --warmup-steps 2 --grad-clip 0.5 --bucket-mb 1 --threads 1 --comm-timeout 60 --quiet)
"$bin" "${args[@]}" --log-json "$tmp/one.jsonl" 2>"$tmp/one.err" || { cat "$tmp/one.err"; exit 1; }
# shellcheck disable=SC2086
"$mpirun" $flags -np "$np" "$bin" "${args[@]}" $layout --log-json "$tmp/mpi.jsonl" \
  --save "$tmp/ckpt" >"$tmp/mpi.out" 2>"$tmp/mpi.err" || { cat "$tmp/mpi.err"; exit 1; }
python3 - "$tmp/one.jsonl" "$tmp/mpi.jsonl" <<'PY'
import json, sys
one = [json.loads(l) for l in open(sys.argv[1])]
mpi = [json.loads(l) for l in open(sys.argv[2])]
assert len(one) == 10 and len(mpi) == 10, f"steps: one rank {len(one)}, mpi {len(mpi)}"
for a, b in zip(one, mpi):
    for k in ("loss", "aux_loss"):
        rel = abs(a[k] - b[k]) / abs(a[k])
        assert rel <= 1e-5, \
            f"step {a['step']}: {k} {a[k]} (one rank) vs {b[k]} (mpi), rel {rel:.2e}"
print("losses and aux losses match over", len(one), "steps; last", one[-1], mpi[-1])
PY
"$bin" generate --model "$tmp/ckpt" --prompt-ids 1,2,3 --max-tokens 4 --print-ids --threads 1 \
  >/dev/null
