#!/usr/bin/env python3
"""Independent PyTorch reference for parallm's training (issue 11): gradients and AdamW steps.

The model is llama_ref.py's forward (RMSNorm, RoPE in the convention config.json names -- Hugging
Face's rotate_half, or the interleaved pairs of Meta / llama2.c when "rope_interleaved" is true --,
causal GQA attention, SwiGLU MLP, tied or untied LM head) run in float64 under autograd, so the
reference itself is exact to float64 rounding and every difference is parallm's f32.

The data order is the one docs/training.md fixes: a raw little-endian array of uint16 (or uint32)
ids; with sequence length S, sequence j is inputs tokens[j*S .. j*S+S-1] and targets
tokens[j*S+1 .. j*S+S]; there are floor((n-1)/S) sequences, used cyclically; step k's global batch
is sequences k*G .. k*G+G-1; the loss of a step is the mean cross-entropy over its G*S targets.
(Micro-batches and data-parallel ranks only split that sum, so they do not appear here.)

Modes:
  grads  one forward/backward of step 0, no optimizer: writes "loss" [1] and "grad/<name>" for
         every parameter (the gradient of the mean loss; tied embeddings get both uses' sum).
  train  --steps N of torch.optim.AdamW (weight decay on 2-D parameters only, through parameter
         groups), torch.nn.utils.clip_grad_norm_ before each step, and the learning rate of step k
         (0-based): lr*(k+1)/warmup for k < warmup, then constant, or
         min_lr + 0.5*(lr - min_lr)*(1 + cos(pi*(k - warmup)/(steps - warmup))). Writes "loss",
         "lr", "grad_norm" [N] (the loss of each step before its update, the norm before clipping)
         and "param/<name>" (the parameters after the last step), and also what grads writes for
         step 0 ("grad/<name>", before clipping; "loss"[0] is its loss), so one run serves both.

The output is a .safetensors file of F64 tensors (written here with the standard library).

Usage: train_ref.py --mode grads|train --model DIR --data F.bin --seq-len S
                    --global-batch-size G [--steps N --lr ... ] --out OUT.safetensors
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402  (the forward pass is shared with the inference reference)


def load_model(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    tensors = llama_ref.load_safetensors(os.path.join(model_dir, "model.safetensors"))
    if cfg.get("tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # the embedding serves both uses
    elif "lm_head.weight" not in tensors:
        sys.exit(f"train_ref.py: {model_dir}: untied model without lm_head.weight")
    # Leaves that autograd differentiates, in float64.
    params = {n: t.clone().to(torch.float64).requires_grad_(True) for n, t in tensors.items()}
    return cfg, params


def load_tokens(path, dtype):
    ids = np.fromfile(path, dtype="<u2" if dtype == "u16" else "<u4").astype(np.int64)
    return ids


def batch(tokens, S, G, step):
    """Inputs and targets [G, S] of step `step`, in the documented order."""
    count = (len(tokens) - 1) // S
    if count < 1:
        sys.exit(f"train_ref.py: data holds {len(tokens)} tokens, fewer than one sequence of {S}+1")
    inputs, targets = [], []
    for i in range(G):
        j = (step * G + i) % count
        inputs.append(tokens[j * S:j * S + S])
        targets.append(tokens[j * S + 1:j * S + S + 1])
    return np.stack(inputs), np.stack(targets)


def mean_loss(cfg, params, inputs, targets):
    """Mean cross-entropy over all G*S targets (sum over sequences, divided once)."""
    total = None
    for seq, tgt in zip(inputs, targets):
        logits = llama_ref.forward(cfg, params, [int(t) for t in seq])  # [S, vocab]
        ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(tgt), reduction="sum")
        total = ce if total is None else total + ce
    return total / inputs.size


def learning_rate(a, k):
    if k < a.warmup_steps:
        return a.lr * (k + 1) / a.warmup_steps
    if a.lr_schedule == "constant":
        return a.lr
    span = a.steps - a.warmup_steps
    progress = (k - a.warmup_steps) / span
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * progress))


def write_f64_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = np.ascontiguousarray(np.asarray(t, dtype="<f8")).tobytes()
        header[name] = {"dtype": "F64", "shape": list(np.shape(t)),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["grads", "train"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--data-dtype", choices=["u16", "u32"], default="u16")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--global-batch-size", type=int, required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max global norm; 0: none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    cfg, params = load_model(a.model)
    tokens = load_tokens(a.data, a.data_dtype)
    if tokens.size and tokens.max() >= cfg["vocab_size"]:
        sys.exit(f"train_ref.py: {a.data}: id {tokens.max()} >= vocab_size {cfg['vocab_size']}")
    S, G = a.seq_len, a.global_batch_size
    out = {}

    if a.mode == "grads":
        inputs, targets = batch(tokens, S, G, 0)
        loss = mean_loss(cfg, params, inputs, targets)
        loss.backward()
        out["loss"] = np.array([loss.item()])
        for n, p in params.items():
            out["grad/" + n] = p.grad.detach().numpy()
    else:
        decay = [p for p in params.values() if p.dim() == 2]
        no_decay = [p for p in params.values() if p.dim() != 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps)
        losses, lrs, norms = [], [], []
        for k in range(a.steps):
            opt.zero_grad(set_to_none=True)
            inputs, targets = batch(tokens, S, G, k)
            loss = mean_loss(cfg, params, inputs, targets)
            loss.backward()
            if k == 0:
                for n, p in params.items():
                    out["grad/" + n] = p.grad.detach().numpy().copy()
            everything = list(params.values())
            if a.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(everything, a.grad_clip)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in everything]))
            lr = learning_rate(a, k)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            losses.append(loss.item())
            lrs.append(lr)
            norms.append(float(norm))
        out["loss"], out["lr"], out["grad_norm"] = np.array(losses), np.array(lrs), np.array(norms)
        for n, p in params.items():
            out["param/" + n] = p.detach().numpy()
    write_f64_safetensors(a.out, out)


if __name__ == "__main__":
    main()
