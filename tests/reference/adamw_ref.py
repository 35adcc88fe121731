#!/usr/bin/env python3
"""Independent PyTorch reference for parallm's optimizer (src/parallm/train/optimizer.h).

Runs torch.optim.AdamW with torch.nn.utils.clip_grad_norm_ and a warm-up + cosine/constant
learning-rate schedule (written out here from the formula in docs/training.md, not imported) on
f32 parameters in two parameter groups: those marked "decay" get the weight decay, the others 0,
as parallm decays 2-D tensors only.

The gradient of parameter i at step k is a_i * p_i + b_ik (elementwise, f32): the gradient of
sum(a/2 p^2 + b_k p), so each step's gradient depends on the parameters the previous steps made.

Input JSON: {"config": {"lr", "min_lr", "warmup_steps", "schedule", "steps", "beta1", "beta2",
"eps", "weight_decay", "grad_clip"}, "params": [{"data": [...], "decay": bool, "a": [...],
"b": [[...] per step]}]}.
Output JSON: {"lr": [per step], "grad_norm": [per step, before clipping], "params": [[...]],
"exp_avg": [[...]], "exp_avg_sq": [[...]]}.

Usage: adamw_ref.py --in in.json --out out.json
"""
import argparse
import json
import math

import torch


def learning_rate(c, k):
    if k < c["warmup_steps"]:
        return c["lr"] * (k + 1) / c["warmup_steps"]
    if c["schedule"] == "constant":
        return c["lr"]
    span = c["steps"] - c["warmup_steps"]
    progress = 1.0 if span <= 0 else min(max((k - c["warmup_steps"]) / span, 0.0), 1.0)
    return c["min_lr"] + 0.5 * (c["lr"] - c["min_lr"]) * (1 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.inp) as f:
        spec = json.load(f)
    c = spec["config"]
    torch.set_num_threads(1)

    params, a, b = [], [], []
    for p in spec["params"]:
        params.append(torch.tensor(p["data"], dtype=torch.float32, requires_grad=True))
        a.append(torch.tensor(p["a"], dtype=torch.float32))
        b.append([torch.tensor(row, dtype=torch.float32) for row in p["b"]])
    decay = [p for p, s in zip(params, spec["params"]) if s["decay"]]
    no_decay = [p for p, s in zip(params, spec["params"]) if not s["decay"]]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": c["weight_decay"]})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                            foreach=False)

    lrs, norms = [], []
    for k in range(c["steps"]):
        lr = learning_rate(c, k)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            for i, p in enumerate(params):
                p.grad = a[i] * p + b[i][k]
        if c["grad_clip"] > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, c["grad_clip"])
        else:
            norm = torch.norm(torch.stack([torch.norm(p.grad, 2) for p in params]), 2)
        opt.step()
        opt.zero_grad()
        lrs.append(lr)
        norms.append(float(norm))

    out = {
        "lr": lrs,
        "grad_norm": norms,
        "params": [p.detach().tolist() for p in params],
        "exp_avg": [opt.state[p]["exp_avg"].tolist() for p in params],
        "exp_avg_sq": [opt.state[p]["exp_avg_sq"].tolist() for p in params],
    }
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
