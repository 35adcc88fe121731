#!/usr/bin/env python3
"""API check of `parallm playground`: each endpoint answers what the CLI prints for the same
inputs, and bad input is a 400 with one line naming the field.

Usage: api_check.py PATH/TO/parallm SOURCE_DIR

Starts `parallm playground --port 0`, then:
  /api/plan         == `parallm plan --json` (parsed JSON, equal as objects) for inference,
                       training, a pasted topology and a pasted config.json;
  /api/schedule     bubble, formula text, makespan and in-flight numbers == `parallm schedule`'s
                       printed ones for every schedule;
  /api/layer-split  bytes per token == the planner's comm_bytes_per_token of that TP layout;
  /api/trace        measured bubble == the last step's busy share computed here from a real
                       `parallm train --pp 2 --trace` file (as scripts/trace-timeline.py reads it);
  bad inputs        400 + {"error": one line naming the field/value};
  SIGTERM           ends the server within 5 s.
Standard library only.
"""
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BIN, SRC = sys.argv[1], sys.argv[2]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def cli(*args):
    return subprocess.run([BIN, *args], check=True, capture_output=True, text=True).stdout


def post(url, body):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    if isinstance(data, str):
        data = data.encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


tmp = tempfile.mkdtemp(prefix="playground-api-")
server = subprocess.Popen([BIN, "playground", "--port", "0"], stdout=subprocess.PIPE, text=True)
try:
    line = server.stdout.readline()
    m = re.search(r"http://[^ ]+/", line)
    if not m:
        sys.exit("playground did not start: %r" % line)
    base = m.group(0)
    with urllib.request.urlopen(base, timeout=10) as r:
        page = r.read().decode()
    check("Watch a pipeline" in page and "<script src=\"/app.js\">" in page, "GET / serves the page")
    with urllib.request.urlopen(base + "app.js", timeout=10) as r:
        check(b"drawTimeline" in r.read(), "GET /app.js serves the script")

    # ---- /api/plan == plan --json ----
    topo = os.path.join(SRC, "tests/fixtures/nvidia-smi-topo/h100-8gpu-nvlink.txt")
    config = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000,
              "max_position_embeddings": 2048}
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    cases = [
        ({"model": "llama-2-7b", "gpu": "a100-80g", "gpus": 8},
         ["--model", "llama-2-7b", "--gpu", "a100-80g", "--gpus", "8"]),
        ({"model": "llama-3-70b", "gpu": "h100-sxm", "gpus": 16, "nodes": 2, "batch": 32,
          "prompt_len": 2048, "output_len": 256, "dtype": "int8", "goal": "throughput"},
         ["--model", "llama-3-70b", "--gpu", "h100-sxm", "--gpus", "16", "--nodes", "2",
          "--batch", "32", "--prompt-len", "2048", "--output-len", "256", "--dtype", "int8",
          "--goal", "throughput"]),
        ({"model": "llama-2-70b", "gpu": "h100-sxm", "gpus": 16, "nodes": 2, "train": True,
          "global_batch": 256, "seq_len": 2048, "schedule": "zb-h1"},
         ["--model", "llama-2-70b", "--gpu", "h100-sxm", "--gpus", "16", "--nodes", "2",
          "--train", "--global-batch", "256", "--seq-len", "2048", "--schedule", "zb-h1"]),
        ({"model": "llama-2-70b", "gpu": "h100-sxm", "gpus": 8, "topology": open(topo).read()},
         ["--model", "llama-2-70b", "--gpu", "h100-sxm", "--gpus", "8", "--topology", topo]),
        ({"config": json.dumps(config), "gpu": "l40s", "gpus": 4, "link": "pcie4"},
         ["--model", cfg_path, "--gpu", "l40s", "--gpus", "4", "--link", "pcie4"]),
    ]
    for body, flags in cases:
        status, got = post(base + "api/plan", body)
        want = json.loads(cli("plan", "--json", *flags))
        if "config" in body:  # the CLI names the file it read; the API the pasted field
            want.pop("model"), got.pop("model", None)
        check(status == 200 and got == want, "/api/plan == plan --json " + " ".join(flags))

    # ---- /api/schedule == schedule ----
    flag_of = {"p": "--pp", "m": "--micro-batches", "schedule": "--schedule", "v": "--chunks",
               "p2p": "--p2p-time", "forward": "--forward-time"}
    for body in [{"schedule": "gpipe"}, {"schedule": "1f1b"}, {"schedule": "interleaved", "v": 2},
                 {"schedule": "zb-h1"}, {"schedule": "zb-h1", "m": 2},
                 {"schedule": "1f1b", "p2p": 0.25, "forward": 1.5}]:
        body = {"p": 4, "m": 8, **body}
        flags = [x for k, v in body.items() for x in (flag_of[k], str(v))]
        text = cli("schedule", *flags)
        status, got = post(base + "api/schedule", body)
        mk = re.search(r"makespan (\S+); bubble fraction (\S+)", text)
        note = text[mk.end():text.index("peak micro-batches")]
        inflight = re.findall(r"stage (\d+): (\S+) \(formula (\S+)\)", text)
        ok = (status == 200 and "%g" % got["makespan"] == mk.group(1)
              and "%.4f" % got["bubble_fraction"] == mk.group(2) and got["formula_text"] == note
              and len(got["stages"]) == 4
              and all("%g" % s["peak_in_flight"] == f and "%g" % s["peak_in_flight_formula"] == g
                      for s, (_, f, g) in zip(got["stages"], inflight)))
        check(ok, "/api/schedule == schedule " + " ".join(flags))
        gaps_ok = all(abs(sum(b - a for a, b in s["idle_spans"]) - s["idle"]) < 1e-9
                      for s in got["stages"])
        check(status == 200 and gaps_ok, "  its idle spans add up to each stage's idle time")
        if body["schedule"] == "zb-h1" and body["m"] == 8:
            types = {a["type"] for s in got["stages"] for a in s["actions"]}
            check(types == {"F", "B", "W"}, "zb-h1 timeline has F, B and W actions")

    # ---- /api/layer-split bytes == the planner's ----
    plan = json.loads(cli("plan", "--json", "--model", "llama-2-7b", "--gpu", "a100-80g", "--gpus",
                          "8", "--tp", "8"))
    status, split = post(base + "api/layer-split",
                         {"model": "llama-2-7b", "tp": 8, "link": "nvlink3"})
    check(status == 200 and split["bytes_sent_per_token"] == plan["layouts"][0]["comm_bytes_per_token"],
          "/api/layer-split bytes per token == plan's comm_bytes_per_token (tp 8)")
    q = next(s for s in split["ranks"][3]["shards"] if s["name"] == "q_proj")
    check(q["shape"] == [512, 4096] and len(split["ranks"]) == 8, "q_proj shard of rank 3 is 512 x 4096")
    status, split = post(base + "api/layer-split", {"model": "llama-3-8b", "tp": 16})
    k = next(s for s in split["ranks"][0]["shards"] if s["name"] == "k_proj")
    check(status == 200 and k["shape"] == [128, 4096] and "replicated on 2" in k["note"],
          "llama-3-8b tp 16: one KV head per rank, replicated on 2")

    # ---- /api/trace on a real train --pp 2 trace ----
    tok = os.path.join(tmp, "tok.bin")
    with open(tok, "wb") as f:
        f.write(struct.pack("<2048H", *[(i * 7919) % 250 for i in range(2048)]))
    trace = os.path.join(tmp, "train.json")
    cli("train", "--init", "tiny", "--data", tok, "--pp", "2", "--steps", "2",
        "--global-batch-size", "4", "--seq-len", "32", "--trace", trace, "--threads", "1")
    with open(trace, "rb") as f:
        raw = f.read()
    status, got = post(base + "api/trace", raw)
    events = json.loads(raw)["traceEvents"]
    rows = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "compute" and re.fullmatch(r"[FBW]\d+(\.\d+)?", e["name"]):
            rows.setdefault(e["pid"], []).append((e["ts"], e["dur"]))
    last = {p: sorted(s)[-len(s) // 2:] for p, s in rows.items()}  # 2 steps: the last one
    t0 = min(s[0][0] for s in last.values())
    t1 = max(a + d for s in last.values() for a, d in s)
    busy = sum(d for s in last.values() for _, d in s)
    want = 1 - busy / (len(last) * (t1 - t0))
    # The server adds and subtracts the spans' ends (ts + dur) where this sums durations: each
    # end is off by up to one unit in the last place of a timestamp, microseconds on a steady clock
    # that counts from boot (~2e-6 us after hours of uptime), which 1e-9 absolute failed once the
    # machine had been up a while. The bound: 4 such units an event, over the step's rank-time.
    n_events = sum(len(s) for s in last.values())
    tol = max(1e-9, 4 * n_events * math.ulp(t1) / (len(last) * (t1 - t0)))
    check(status == 200 and got["pipeline"] and got["steps"] == 2 and got["ranks_count"] == 2
          and abs(got["measured_bubble"] - want) < tol,
          "/api/trace measured bubble %.12f == the last step's (%.12f); status %s, steps %s, "
          "ranks %s" % (got.get("measured_bubble", -1), want, status, got.get("steps"),
                        got.get("ranks_count")))
    status, sim = post(base + "api/schedule", got["simulate"])
    check(status == 200 and sim["p"] == 2 and sim["m"] == 4, "the trace's simulate body runs (p 2, m 4)")

    # TP 2 x PP 2: four ranks, two stages (the simulator's p is the stage count, not the ranks).
    trace = os.path.join(tmp, "train-tp2pp2.json")
    cli("train", "--init", "tiny", "--data", tok, "--pp", "2", "--tp", "2", "--steps", "1",
        "--global-batch-size", "4", "--seq-len", "32", "--trace", trace, "--threads", "1")
    with open(trace, "rb") as f:
        status, got = post(base + "api/trace", f.read())
    check(status == 200 and got["ranks_count"] == 4 and got["stages"] == 2
          and got["simulate"]["p"] == 2
          and [x["stage"] for x in got["rank_stages"]] == [0, 0, 1, 1],
          "/api/trace: TP 2 x PP 2 trace -> ranks 0,1 stage 0 and 2,3 stage 1")
    # generate --tp 2: one stage, no pipeline to compare; bubble over the compute spans.
    trace = os.path.join(tmp, "generate-tp2.json")
    cli("generate", "--model", os.path.join(SRC, "models/stories260K/stories260K.bin"),
        "--prompt-ids", "1", "--max-tokens", "4", "--tp", "2", "--threads", "1", "--trace", trace)
    with open(trace, "rb") as f:
        status, got = post(base + "api/trace", f.read())
    check(status == 200 and got["ranks_count"] == 2 and not got["pipeline"]
          and 0 <= got["measured_bubble"] < 1 and "simulate" not in got,
          "/api/trace: generate --tp 2 trace is no pipeline; bubble %.4f" % got.get("measured_bubble", -1))

    # ---- bad input: 400 + one line naming the field ----
    bad = [
        ("api/plan", {"config": "{\"hidden_size\": 64}"}, "config (pasted config.json)"),
        ("api/plan", {"config": "not json"}, "config"),
        ("api/plan", {"model": "llama-2-7b", "topology": "GPU0 hello\nnot a matrix"}, "topology"),
        ("api/plan", {"model": "llama-2-7b", "gpus": 64, "pp": 64}, "PP=64 exceeds the 32 layers"),
        ("api/plan", {"model": "llama-2-7b", "gpus": "eight"}, "gpus must be an integer"),
        ("api/plan", {"model": "llama-2-7b", "gpus": 0}, "--gpus"),
        ("api/plan", {"model": "no-such-model"}, "no-such-model"),
        ("api/plan", {"model": "llama-2-7b", "batchh": 2}, "unknown field \"batchh\""),
        ("api/schedule", {"p": 8, "layers": 4}, "more than the model's 4 layers"),
        ("api/schedule", {"p": 0}, "--pp must be in 1..1024, got 0"),
        ("api/schedule", {"schedule": "zigzag"}, "zigzag"),
        ("api/schedule", {"p": 64, "m": 1024}, "is more than the 16384 the playground draws"),
        ("api/layer-split", {"model": "llama-2-7b", "tp": 3}, "tp 3 does not split"),
        ("api/trace", {"x": 1}, "traceEvents"),
        ("api/trace", [{"ph": "X", "pid": 0, "ts": 0, "dur": -1}], "traceEvents[0].dur"),
        ("api/trace", [{"ph": "X", "pid": 0, "ts": 0, "dur": 1, "name": 5}], "traceEvents[0].name"),
        ("api/plan", "{not json", "invalid JSON"),
    ]
    for path, body, needle in bad:
        status, got = post(base + path, body)
        err = got.get("error", "") if isinstance(got, dict) else ""
        check(status == 400 and needle in err and "\n" not in err,
              "%s %s -> 400 %r" % (path, json.dumps(body)[:60], err[:110]))

    # ---- odd values in every field: a 200 or a 400, never a 500, and the server lives ----
    import random
    rnd = random.Random(1)
    odd = [None, True, -1, 0, 1, 2**63, -2**63, 1e308, 1.5, "", "x", [], [1, "a"], {},
           {"a": [1]}, "9" * 400]
    fields = {"api/plan": ["config", "gpu", "gpus", "nodes", "topology", "tp", "pp", "batch",
                           "train", "seq_len", "zero", "chunks", "dtype", "micro_batch"],
              "api/schedule": ["p", "m", "v", "schedule", "forward", "backward", "weight", "p2p",
                               "forward_only", "stage_forward", "layers"],
              "api/layer-split": ["config", "tp", "dtype", "link"]}
    statuses = {}
    for _ in range(300):
        path = rnd.choice(list(fields) + ["api/trace"])
        if path == "api/trace":
            body = [{"ph": rnd.choice(["X", "M"]), "pid": rnd.choice(odd), "ts": rnd.choice(odd),
                     "dur": rnd.choice(odd), "name": rnd.choice(["F0", "B1.2", "W3", 5, None]),
                     "cat": rnd.choice(["compute", "comm", None, 1])}
                    for _ in range(rnd.randint(0, 4))]
        else:
            body = {"model": "llama-2-7b"}
            for _ in range(rnd.randint(1, 3)):
                body[rnd.choice(fields[path])] = rnd.choice(odd)
        status, got = post(base + path, body)
        statuses[status] = statuses.get(status, 0) + 1
        if status not in (200, 400):
            check(False, "%s %s -> %d %s" % (path, json.dumps(body)[:120], status, got))
    check(set(statuses) <= {200, 400} and server.poll() is None,
          "300 requests with odd field values: %s, server alive" % statuses)
finally:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=5)
        check(True, "SIGTERM ends the server")
    except subprocess.TimeoutExpired:
        server.kill()
        check(False, "SIGTERM ends the server within 5 s")

# ---- the command's own errors: one line, no hang ----
r = subprocess.run([BIN, "playground", "--port", "70000"], capture_output=True, text=True,
                   timeout=10)
check(r.returncode == 1 and "--port 70000" in r.stderr and r.stderr.count("\n") == 1,
      "playground --port 70000 -> one line: %r" % r.stderr.strip())
busy = subprocess.Popen([BIN, "playground", "--port", "0"], stdout=subprocess.PIPE, text=True)
try:
    port = re.search(r":(\d+)/", busy.stdout.readline()).group(1)
    r = subprocess.run([BIN, "playground", "--port", port], capture_output=True, text=True,
                       timeout=10)
    check(r.returncode == 1 and "cannot listen" in r.stderr and r.stderr.count("\n") == 1,
          "a port in use -> one line: %r" % r.stderr.strip())
finally:
    busy.terminate()
    busy.wait(timeout=5)

print("%d failure(s)" % len(failures))
sys.exit(1 if failures else 0)
