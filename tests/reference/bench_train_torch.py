#!/usr/bin/env python3
"""PyTorch's side of scripts/bench-train-vs-torch.sh: training tokens/s of a LLaMA at f32.

The same architecture as llama_ref.py / train_ref.py (RMSNorm, rotate_half RoPE, causal GQA
attention, SwiGLU, tied or untied head) written batched, in float32, as an ordinary PyTorch
training loop would be: forward, cross-entropy, backward, clip_grad_norm_, torch.optim.AdamW.
PyTorch 1.13 (Debian's) has no fused attention, so attention is the plain matmul-softmax-matmul.

It loads the model directory parallm trains (config.json + model.safetensors), so both sides run
the same weights, and reads the data in parallm's documented order (uint16 ids; sequence j is
tokens[j*S .. j*S+S]; step k takes sequences k*G .. k*G+G-1, cyclically), in micro-batches of M
sequences with gradient accumulation.

Prints one line per timed step and a final line:
  torch tokens/s: N (threads T, batch G x S, micro-batch M, P parameters)
Usage: bench_train_torch.py --model DIR --data F.bin --seq-len S --micro-batch-size M
                            --global-batch-size G --steps N --warmup 2 --threads T
"""
import argparse
import json
import math
import os
import sys
import time

# OpenBLAS (Debian's torch does its matrix products there) sizes its own thread pool from the
# environment when it loads, and torch.set_num_threads does not reach it: give it --threads too.
if "--threads" in sys.argv[:-1]:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", sys.argv[sys.argv.index("--threads") + 1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402  (safetensors reader and RoPE frequencies)


class Llama(torch.nn.Module):
    def __init__(self, cfg, tensors):
        super().__init__()
        self.cfg = cfg
        self.p = torch.nn.ParameterDict(
            {n.replace(".", "/"): torch.nn.Parameter(t.to(torch.float32))
             for n, t in tensors.items()})
        self.tied = cfg.get("tie_word_embeddings", False)
        self.interleaved = cfg.get("rope_interleaved", False)

    def w(self, name):
        return self.p[name.replace(".", "/")]

    def forward(self, ids, ang):
        cfg = self.cfg
        B, T = ids.shape
        nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        eps = cfg.get("rms_norm_eps", 1e-6)
        cos, sin = torch.cos(ang), torch.sin(ang)  # [T, hd/2]
        if not self.interleaved:
            cos = torch.cat((cos, cos), -1)[None, :, None, :]
            sin = torch.cat((sin, sin), -1)[None, :, None, :]

        def rope(x):  # [B, T, heads, hd]
            if self.interleaved:
                a, b = x[..., 0::2], x[..., 1::2]
                c, s = cos[None, :, None, :], sin[None, :, None, :]
                return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)
            h = hd // 2
            return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

        def norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

        mask = torch.full((T, T), float("-inf")).triu(1)
        x = F.embedding(ids, self.w("model.embed_tokens.weight"))
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = norm(x, self.w(p + "input_layernorm.weight"))
            q = rope((h @ self.w(p + "self_attn.q_proj.weight").T).view(B, T, nh, hd))
            k = rope((h @ self.w(p + "self_attn.k_proj.weight").T).view(B, T, nkv, hd))
            v = (h @ self.w(p + "self_attn.v_proj.weight").T).view(B, T, nkv, hd)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
            if nh != nkv:
                k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1)
            o = (att @ v).transpose(1, 2).reshape(B, T, nh * hd)
            x = x + o @ self.w(p + "self_attn.o_proj.weight").T
            h = norm(x, self.w(p + "post_attention_layernorm.weight"))
            g = h @ self.w(p + "mlp.gate_proj.weight").T
            u = h @ self.w(p + "mlp.up_proj.weight").T
            x = x + (F.silu(g) * u) @ self.w(p + "mlp.down_proj.weight").T
        x = norm(x, self.w("model.norm.weight"))
        head = self.w("model.embed_tokens.weight") if self.tied else self.w("lm_head.weight")
        return x @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--micro-batch-size", type=int, required=True)
    ap.add_argument("--global-batch-size", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    tensors = llama_ref.load_safetensors(os.path.join(a.model, "model.safetensors"))
    if cfg.get("tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    model = Llama(cfg, tensors)
    del tensors
    params = list(model.parameters())
    nparams = sum(p.numel() for p in params)
    decay = [p for p in params if p.dim() == 2]
    no_decay = [p for p in params if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))

    S, M, G = a.seq_len, a.micro_batch_size, a.global_batch_size
    if G % M:
        sys.exit(f"bench_train_torch.py: --global-batch-size {G} is not a multiple of "
                 f"--micro-batch-size {M}")
    tokens = torch.from_numpy(np.fromfile(a.data, dtype="<u2").astype(np.int64))
    count = (tokens.numel() - 1) // S
    if count < 1:
        sys.exit(f"bench_train_torch.py: {a.data}: fewer than {S + 1} tokens")
    ang = llama_ref.rope_tables(cfg, torch.arange(S)).to(torch.float32)

    def step(k):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m0 in range(0, G, M):
            js = [(k * G + m0 + i) % count for i in range(M)]
            seqs = torch.stack([tokens[j * S:j * S + S + 1] for j in js])
            logits = model(seqs[:, :-1], ang)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1),
                                   reduction="sum") / (G * S)
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        return total, float(norm)

    for k in range(a.warmup):
        step(k)
    t0 = time.perf_counter()
    for k in range(a.warmup, a.warmup + a.steps):
        ts = time.perf_counter()
        loss, norm = step(k)
        dt = time.perf_counter() - ts
        print(f"step {k}: loss {loss:.4f} grad_norm {norm:.3f} {G * S / dt:.0f} tokens/s",
              flush=True)
    tps = a.steps * G * S / (time.perf_counter() - t0)
    print(f"torch tokens/s: {tps:.1f} (threads {a.threads}, batch {G} x {S}, micro-batch {M}, "
          f"{nparams} parameters)")


if __name__ == "__main__":
    main()
