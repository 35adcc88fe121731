#!/usr/bin/env bash
# Training under MPI, one process per rank: `mpirun -np N parallm train LAYOUT` gives the losses of
# one rank (threads, same flags) within 1e-5 relative at every step, and its checkpoint loads.
# MODEL: dense (default) or moe (a Mixtral-style model for --ep; the load-balancing losses too).
# Usage: mpi_train_check.sh PARALLM MPIRUN "MPI FLAGS" NP "LAYOUT FLAGS" [MODEL]
set -euo pipefail
bin=$1 mpirun=$2 flags=$3 np=$4 layout=$5 model=${6:-dense}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "$model" = moe ]; then
  # tests/train/moe_train_test.cpp's tiny_moe: 4 experts top-2 (EP 3 holds 2, 1, 1), FFN 24.
  vocab=64 micro=1 keys='("loss", "aux_loss")'
  cat >"$tmp/config.json" <<'JSON'
{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 32,
 "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64, "max_position_embeddings": 64,
 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "num_local_experts": 4,
 "num_experts_per_tok": 2, "router_aux_loss_coef": 0.01}
JSON
else
  # tests/train/train_config.h's tiny_train_config: heads fit TP 1-4, uneven FFN and vocabulary.
  vocab=67 micro=2 keys='("loss",)'
  cat >"$tmp/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48,
 "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 24,
 "num_key_value_heads": 12, "head_dim": 4, "vocab_size": 67, "max_position_embeddings": 64,
 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
JSON
fi
python3 - "$tmp/data.bin" "$vocab" <<'PY'
import random, struct, sys
r = random.Random(5)
v = int(sys.argv[2])
ids = [(r.randrange(v) * r.randrange(v)) // v for _ in range(3000)]
open(sys.argv[1], "wb").write(struct.pack("<%dH" % len(ids), *ids))
PY
args=(train --init "$tmp/config.json" --seed 3 --data "$tmp/data.bin" --seq-len 8
      --micro-batch-size "$micro" --global-batch-size 12 --steps 10 --lr 1e-2 --min-lr 1e-3
      --warmup-steps 2 --grad-clip 0.5 --bucket-mb 1 --threads 1 --comm-timeout 60 --quiet)
"$bin" "${args[@]}" --log-json "$tmp/one.jsonl" 2>"$tmp/one.err" || { cat "$tmp/one.err"; exit 1; }
# shellcheck disable=SC2086
"$mpirun" $flags -np "$np" "$bin" "${args[@]}" $layout --log-json "$tmp/mpi.jsonl" \
  --save "$tmp/ckpt" --trace "$tmp/trace.json" --comm-stats >"$tmp/mpi.out" 2>"$tmp/mpi.err" ||
  { cat "$tmp/mpi.err"; exit 1; }
# --trace and --comm-stats across the processes: every rank's row in the trace; with DP, each
# rank's communication thread's row ("dp comm") with its buckets, and the dp group's bucket
# reductions in rank 0's table (all-reduces; with --zero 1 reduce-scatters).
python3 - "$tmp/trace.json" "$np" "$layout" <<'PY' || { cat "$tmp/mpi.err"; exit 1; }
import json, sys
events = json.load(open(sys.argv[1]))["traceEvents"]
np_, dp = int(sys.argv[2]), "--dp" in sys.argv[3]
ranks = {e["pid"] for e in events if e.get("name") == "process_name"}
assert ranks == set(range(np_)), f"trace ranks {sorted(ranks)}, want 0..{np_ - 1}"
if dp:
    named = {e["pid"] for e in events if e.get("name") == "thread_name" and e["args"]["name"] == "dp comm"}
    buckets = {e["pid"] for e in events if e.get("ph") == "X" and e["name"].startswith("dp bucket ")}
    assert named == ranks and buckets == ranks, f"dp comm rows {sorted(named)}, buckets {sorted(buckets)}"
PY
if [[ $layout == *--dp* ]]; then
  want=$([[ $layout == *--zero* ]] && echo reduce_scatter || echo all_reduce)
  grep -q "^dp  *$want " "$tmp/mpi.out" "$tmp/mpi.err" ||
    { cat "$tmp/mpi.out" "$tmp/mpi.err"; echo "FAIL: no dp $want line in --comm-stats"; exit 1; }
fi
python3 - "$tmp/one.jsonl" "$tmp/mpi.jsonl" "$keys" <<'PY'
import ast, json, sys
one = [json.loads(l) for l in open(sys.argv[1])]
mpi = [json.loads(l) for l in open(sys.argv[2])]
assert len(one) == 10 and len(mpi) == 10, f"steps: one rank {len(one)}, mpi {len(mpi)}"
for a, b in zip(one, mpi):
    for k in ast.literal_eval(sys.argv[3]):
        rel = abs(a[k] - b[k]) / abs(a[k])
        assert rel <= 1e-5, \
            f"step {a['step']}: {k} {a[k]} (one rank) vs {b[k]} (mpi), rel {rel:.2e}"
print("losses match over", len(one), "steps; last", one[-1], mpi[-1])
PY
"$bin" generate --model "$tmp/ckpt" --prompt-ids 1,2,3 --max-tokens 4 --print-ids --threads 1 \
  >/dev/null
