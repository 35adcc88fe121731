#!/usr/bin/env bash
# The real `parallm serve` end to end, as a user runs it: stories260K with the test tokenizer of
# serve_e2e_test.cpp, TP 2 x PP 2 as threads on an ephemeral port.
#   - /health answers 200 once the ranks are loaded;
#   - raw HTTP (curl): the greedy completion, streamed and not, equals `parallm generate`'s text;
#   - the official `openai` npm client (openai_client_test.sh) against it, with the same expected
#     text (that part alone is skipped where npm or its registry is missing: exit 77 there);
#   - `parallm bench serve` (8 prompts at once): completed 8, failed 0;
#   - SIGTERM ends the server within 10 s with status 0;
#   - a tiny Mixtral under `serve --tp 2 --enable-expert-parallel` completes generate's greedy
#     ids; the flag on a dense model is generate's one-line error;
#   - with an mpirun (3rd argument): `mpirun -np 2 parallm serve --pp 2` answers the same greedy
#     completion and ends on SIGTERM to mpirun within 10 s; so does `mpirun -np 4 parallm serve
#     --pp 2 --dp 2`, with two requests running at once on one sequence per replica.
#
#   serve_cli_check.sh PARALLM_BIN TEST_SERVER_BIN [MPIRUN "MPIRUN_FLAGS"]
set -uo pipefail
bin="${1:?usage: serve_cli_check.sh PARALLM_BIN TEST_SERVER_BIN [MPIRUN FLAGS]}"
test_server="${2:?usage: serve_cli_check.sh PARALLM_BIN TEST_SERVER_BIN [MPIRUN FLAGS]}"
mpirun="${3:-}"
mpiflags="${4:-}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3

tmp="$(mktemp -d)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  [ -n "${KEEP_TMP:-}" ] && echo "kept $tmp" || rm -rf "$tmp"
}
trap cleanup EXIT
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}

# The model directory: stories260K beside the test tokenizer (padded to its 512 ids).
PARALLM_E2E_MODEL_DIR="$tmp/model" "$test_server" \
  --gtest_filter=ServeE2E.DISABLED_WriteCliModelDir --gtest_also_run_disabled_tests >"$tmp/write.log" 2>&1 || { cat "$tmp/write.log"; exit 1; }
cp "$root/models/stories260K/stories260K.bin" "$tmp/model/"
model="$tmp/model/stories260K.bin"

prompt="Once upon a time"
ntok=16
# generate prints the prompt, the generated text and a newline.
"$bin" generate --model "$model" --prompt "$prompt" --max-tokens $ntok --threads 1 \
  >"$tmp/generate.out" 2>"$tmp/generate.err" || { cat "$tmp/generate.err"; exit 1; }
$py - "$tmp/generate.out" "$prompt" "$tmp/expected" <<'EOF'
import sys
out = open(sys.argv[1], encoding='utf-8').read()
prompt = sys.argv[2]
assert out.startswith(prompt) and out.endswith('\n'), repr(out)
open(sys.argv[3], 'w', encoding='utf-8').write(out[len(prompt):-1])
EOF
[ -s "$tmp/expected" ] || { echo "no expected text"; exit 1; }
echo "expected greedy text: $(cat "$tmp/expected")"

# Starts a server command in the background: sets pid and port (from its 'serve: http://...' line)
# and waits for /health 200 (30 s at most).
start_server() {
  local log="$1"
  shift
  "$@" >"$log" 2>&1 &
  pid=$!
  port=""
  for _ in $(seq 300); do
    port="$(grep -o 'serve: http://127.0.0.1:[0-9]*' "$log" | head -1 | sed 's/.*://')"
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "the server did not start:"; cat "$log"; return 1; }
  for _ in $(seq 300); do
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")"
    [ "$code" = 200 ] && return 0
    sleep 0.1
  done
  echo "/health never answered 200:"
  cat "$log"
  return 1
}

# SIGTERM, then the process must be gone within 10 s with status `want` (Open MPI's mpirun
# answers a SIGTERM with status 1 even when every rank exits 0 on it, so "any" there; its log
# shows instead that rank 0 shut down cleanly).
stop_server() {
  local what="$1" want="${2:-0}"
  kill -TERM "$pid"
  local t0=$SECONDS
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    fail "$what ignored SIGTERM for 10 s"
    kill -KILL "$pid"
  fi
  wait "$pid"
  local rc=$?
  pid=""
  [ "$want" = any ] || [ $rc = "$want" ] || fail "$what exited with status $rc after SIGTERM"
  echo "$what: ended $((SECONDS - t0)) s after SIGTERM, status $rc"
}

# Greedy completion over raw HTTP, not streamed and streamed; the text must equal the expected.
check_completion() {
  local what="$1" stream="$2"
  curl -s --max-time 30 "http://127.0.0.1:$port/v1/completions" \
    -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"$prompt\", \"max_tokens\": $ntok, \"temperature\": 0, \"stream\": $stream}" \
    >"$tmp/reply" || { fail "$what: curl failed"; return; }
  $py - "$tmp/reply" "$tmp/expected" "$stream" <<'EOF' || fail "$what (stream $stream)"
import json, sys
body = open(sys.argv[1], encoding='utf-8').read()
want = open(sys.argv[2], encoding='utf-8').read()
if sys.argv[3] == 'true':
    events = body.split('\n\n')
    assert events[-1] == '' and events[-2] == 'data: [DONE]', repr(body[-80:])
    text = ''.join(c['text'] for e in events[:-2] for c in json.loads(e[len('data: '):])['choices'])
else:
    reply = json.loads(body)
    text = reply['choices'][0]['text']
    assert reply['usage']['completion_tokens'] == 16, body
if text != want:
    print(f'got {text!r}, want {want!r}')
    sys.exit(1)
EOF
}

# --kv-cache-memory: a bad value is one line naming the flag and the value, and a failure.
for bad in 1.5 0 12XB; do
  "$bin" serve --model "$model" --port 0 --kv-cache-memory "$bad" >"$tmp/bad.out" 2>"$tmp/bad.err"
  rc=$?
  [ $rc != 0 ] || fail "--kv-cache-memory $bad was accepted"
  grep -q -- "--kv-cache-memory $bad:" "$tmp/bad.err" || fail "--kv-cache-memory $bad: $(cat "$tmp/bad.err")"
  [ "$(wc -l <"$tmp/bad.err")" = 1 ] || fail "--kv-cache-memory $bad: not one line: $(cat "$tmp/bad.err")"
done

# --- threads: TP 2 x PP 2, the KV cache a fraction of MemAvailable ---
start_server "$tmp/serve.log" "$bin" serve --model "$model" --port 0 --tp 2 --pp 2 --threads 1 \
  --max-num-seqs 16 --kv-cache-memory 0.001 || exit 1
grep "kv-cache-memory 0.001 of MemAvailable" "$tmp/serve.log" ||
  fail "the fraction's bytes and blocks were not printed: $(cat "$tmp/serve.log")"
url="http://127.0.0.1:$port"
echo "serve (tp 2 x pp 2) at $url"
check_completion "raw HTTP completion" false
check_completion "raw HTTP completion" true

npm_rc=0
bash "$here/openai_client_test.sh" "$url" --expected "$tmp/expected" --prompt "$prompt" \
  --max-tokens $ntok || npm_rc=$?
if [ $npm_rc = 77 ]; then
  echo "openai npm client part skipped (no npm or registry); the raw HTTP part ran"
elif [ $npm_rc != 0 ]; then
  fail "openai npm client against parallm serve (exit $npm_rc)"
fi

"$bin" bench serve --base-url "$url" --num-prompts 8 --request-rate inf --random-input-len 16 \
  --random-output-len 8 --result-file "$tmp/bench.json" >"$tmp/bench.log" 2>&1 ||
  { cat "$tmp/bench.log"; fail "bench serve exited with an error"; }
$py -c "
import json, sys
j = json.load(open('$tmp/bench.json'))
print('bench serve: completed', j['completed'], 'failed', j['failed'])
sys.exit(0 if j['completed'] == 8 and j['failed'] == 0 else 1)" ||
  fail "bench serve: not 8 completed, 0 failed"

stop_server "parallm serve --tp 2 --pp 2"

# --- a tiny Mixtral, experts over the TP ranks: serve --tp 2 --enable-expert-parallel ---
# Its greedy ids from `generate` at one rank, shown through the test tokenizer (/detokenize), must
# be the completion's text, 8 tokens. A dense model with the flag is one line, generate's.
"$bin" init-model --shape mixtral-tiny --seed 5 --dtype f32 --out "$tmp/mix" >/dev/null ||
  { echo "init-model mixtral-tiny failed"; exit 1; }
"$bin" generate --model "$tmp/mix" --prompt-ids 1,7,11 --max-tokens 8 --print-ids --ignore-eos \
  --threads 1 2>/dev/null | tr -s ' \n' ',' | sed 's/^,//; s/,$//' >"$tmp/mix.ids"
start_server "$tmp/mix.log" "$bin" serve --model "$tmp/mix" \
  --tokenizer "$tmp/model/tokenizer.json" --port 0 --tp 2 --enable-expert-parallel --threads 1 ||
  exit 1
curl -s --max-time 30 "http://127.0.0.1:$port/detokenize" -H 'Content-Type: application/json' \
  -d "{\"tokens\": [$(cat "$tmp/mix.ids")]}" >"$tmp/mix.want"
curl -s --max-time 30 "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": [1, 7, 11], "max_tokens": 8, "temperature": 0, "ignore_eos": true}' \
  >"$tmp/mix.reply"
$py - "$tmp/mix.reply" "$tmp/mix.want" "$tmp/mix.ids" <<'EOF' || fail "serve with experts over tp"
import json, sys
reply = json.load(open(sys.argv[1]))
want = json.load(open(sys.argv[2]))['prompt']
ids = open(sys.argv[3]).read().strip()
assert len(ids.split(',')) == 8, ids
assert reply['usage']['completion_tokens'] == 8, reply
if reply['choices'][0]['text'] != want:
    print(f"got {reply['choices'][0]['text']!r}, want {want!r} (generate's ids {ids})")
    sys.exit(1)
print(f"serve --tp 2 --enable-expert-parallel: generate's ids {ids}, the same text")
EOF
stop_server "parallm serve --tp 2 --enable-expert-parallel"
"$bin" serve --model "$model" --port 0 --enable-expert-parallel >"$tmp/bad.out" 2>"$tmp/bad.err" &&
  fail "--enable-expert-parallel on a dense model was accepted"
want_err="parallm: error: [cli] --enable-expert-parallel needs a mixture-of-experts model"
[ "$(cat "$tmp/bad.err")" = "$want_err (this one is dense)" ] ||
  fail "dense --enable-expert-parallel: $(cat "$tmp/bad.err")"

# --- mpirun: PP 2 as two processes ---
if [ -n "$mpirun" ]; then
  # shellcheck disable=SC2086  # the flags are words
  start_server "$tmp/mpi.log" "$mpirun" $mpiflags -np 2 "$bin" serve --model "$model" --port 0 \
    --pp 2 --threads 1 --kv-cache-memory 0.001 || exit 1
  echo "mpirun -np 2 parallm serve --pp 2 at http://127.0.0.1:$port"
  check_completion "mpirun: raw HTTP completion" false
  stop_server "mpirun -np 2 parallm serve --pp 2" any
  grep -q "serve: signal 15, shutting down" "$tmp/mpi.log" ||
    fail "mpirun: rank 0 did not shut down on the SIGTERM"
  if grep -q "^\[serve\]\|exited on signal\|MPI_ABORT" "$tmp/mpi.log"; then
    fail "mpirun: a rank failed on the way out"
  fi
  cat "$tmp/mpi.log"

  # DP 2 x PP 2 as four processes: the schedulers in rank 0's process, replica 1's first rank
  # (world rank 1) fed over MPI. One sequence per replica (--max-num-seqs 1): two requests running
  # at once prove that the second replica serves; every answer is the greedy text.
  # shellcheck disable=SC2086
  start_server "$tmp/mpi_dp.log" "$mpirun" $mpiflags -np 4 "$bin" serve --model "$model" \
    --port 0 --pp 2 --dp 2 --threads 1 --max-num-seqs 1 || exit 1
  echo "mpirun -np 4 parallm serve --pp 2 --dp 2 at http://127.0.0.1:$port"
  check_completion "mpirun dp 2: raw HTTP completion" false
  check_completion "mpirun dp 2: raw HTTP completion" true
  for i in 1 2 3 4; do
    curl -s --max-time 60 "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
      -d '{"prompt": [1, 5, 6], "max_tokens": 400, "temperature": 0, "ignore_eos": true}' \
      >"$tmp/long$i" &
  done
  most=0
  for _ in $(seq 200); do
    n="$(curl -s "http://127.0.0.1:$port/metrics" | grep '^parallm:num_requests_running' | awk '{print int($2)}')"
    [ "${n:-0}" -gt "$most" ] && most=$n
    [ "$most" -ge 2 ] && break
    sleep 0.02
  done
  wait $(jobs -p | grep -v "^$pid\$") 2>/dev/null
  [ "$most" -ge 2 ] || fail "mpirun dp 2: never two requests running (the second replica idle)"
  for i in 1 2 3 4; do
    cmp -s <($py -c "import json,sys; print(json.load(open('$tmp/long$i'))['choices'][0]['text'])") \
      <($py -c "import json,sys; print(json.load(open('$tmp/long1'))['choices'][0]['text'])") ||
      fail "mpirun dp 2: long request $i differs from the first"
  done
  echo "mpirun dp 2: at most $most requests running at once"
  stop_server "mpirun -np 4 parallm serve --pp 2 --dp 2" any
  grep -q "serve: signal 15, shutting down" "$tmp/mpi_dp.log" ||
    fail "mpirun dp 2: rank 0 did not shut down on the SIGTERM"
  if grep -q "^\[serve\]\|exited on signal\|MPI_ABORT" "$tmp/mpi_dp.log"; then
    fail "mpirun dp 2: a rank failed on the way out"
  fi
fi

[ $fails = 0 ] && echo "serve_cli_check: all passed"
exit $((fails > 0))
