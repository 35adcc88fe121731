#!/usr/bin/env python3
"""Independent PyTorch reference for parallm's LLaMA forward pass.

Reads a Hugging Face-format model (config.json + model.safetensors, parsed here with the standard
library and torch only) and runs greedy decoding in float64, following Hugging Face's
LlamaForCausalLM conventions (RMSNorm, rotate_half RoPE, grouped-query attention, SwiGLU MLP),
and MixtralForCausalLM's sparse MoE block when config.json has num_local_experts, and
Qwen2MoeForCausalLM's (model_type qwen2_moe: q/k/v biases, top-k without renormalisation unless
norm_topk_prob, a sigmoid-gated shared expert, dense layers in mlp_only_layers or off
decoder_sparse_step).
Writes {"tokens": [...], "logits": [[...], ...]} as JSON: logits[i] is the full-vocabulary row
that chose tokens[i] (logits[0] comes from the prompt's last position).

Usage: llama_ref.py --model DIR --prompt-ids 1,2,3 --steps 8 --out ref.json
"""
import argparse
import json
import math
import os
import struct

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = bytearray(data[base + begin:base + end])
        t = torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]) if raw else torch.empty(0, dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"]).to(torch.float64)
    return out


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_tables(cfg, positions):
    hd = cfg["head_dim"]
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, hd/2]
    return ang


def apply_rope(x, ang, interleaved):
    # x: [T, heads, hd]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    if interleaved:  # pairs (2i, 2i+1), Meta / llama2.c
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    return x * cos2 + rotate_half(x) * sin2


def mixtral_moe(cfg, w, p, h):
    """Mixtral's sparse MoE block, from its formulas: router logits h.Wg^T; softmax over all
    experts in float32; the top-k; their weights renormalised to sum to 1; the weighted sum of
    those experts' SwiGLU outputs, w2(silu(w1 h) * w3 h). Expert maths in float64."""
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    logits = (h @ w[p + "gate.weight"].T).to(torch.float32)
    probs = torch.softmax(logits, dim=-1)
    top_w, top_e = torch.topk(probs, k, dim=-1)
    top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(torch.float64)
    # gates[t, e]: token t's weight for expert e, 0 where e is not among its top k.
    gates = torch.zeros(h.shape[0], E, dtype=torch.float64).scatter(1, top_e, top_w)
    out = torch.zeros_like(h)
    for e in range(E):
        q = f"{p}experts.{e}."
        a = torch.nn.functional.silu(h @ w[q + "w1.weight"].T) * (h @ w[q + "w3.weight"].T)
        out += gates[:, e:e + 1] * (a @ w[q + "w2.weight"].T)
    return out


def swiglu(w, q, h):
    """gate_proj/up_proj/down_proj SwiGLU at prefix q."""
    a = torch.nn.functional.silu(h @ w[q + "gate_proj.weight"].T) * (h @ w[q + "up_proj.weight"].T)
    return a @ w[q + "down_proj.weight"].T


def qwen2_moe(cfg, w, p, h):
    """Qwen2-MoE's sparse block from its formulas: router logits h.Wg^T; softmax over all experts
    in float32; the top-k, renormalised only when norm_topk_prob; the weighted sum of those
    experts' SwiGLU outputs; plus sigmoid(h.w_sg) * shared_expert(h). Expert maths in float64."""
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    logits = (h @ w[p + "gate.weight"].T).to(torch.float32)
    probs = torch.softmax(logits, dim=-1)
    top_w, top_e = torch.topk(probs, k, dim=-1)
    if cfg.get("norm_topk_prob", False):
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    gates = torch.zeros(h.shape[0], E, dtype=torch.float64).scatter(1, top_e, top_w.to(torch.float64))
    out = torch.zeros_like(h)
    for e in range(E):
        out += gates[:, e:e + 1] * swiglu(w, f"{p}experts.{e}.", h)
    if p + "shared_expert.gate_proj.weight" in w:
        sg = torch.sigmoid(h @ w[p + "shared_expert_gate.weight"].T)  # [T, 1]
        out += sg * swiglu(w, p + "shared_expert.", h)
    return out


def qwen2_layer_is_sparse(cfg, i):
    step = cfg.get("decoder_sparse_step", 1)
    return i not in cfg.get("mlp_only_layers", []) and cfg["num_experts"] > 0 and (i + 1) % step == 0


def forward(cfg, w, ids):
    """Full causal forward over the whole sequence (no cache: independent of parallm's design)."""
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg["head_dim"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    T = len(ids)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    ang = rope_tables(cfg, torch.arange(T))
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    inter = cfg.get("rope_interleaved", False)
    qwen = cfg.get("model_type") == "qwen2_moe"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        if qwen:  # Qwen2: q/k/v biases, before RoPE
            q, k, v = (t + w[p + f"self_attn.{n}_proj.bias"] for t, n in zip((q, k, v), "qkv"))
        q, k, v = q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd)
        q, k = apply_rope(q, ang, inter), apply_rope(k, ang, inter)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hqk,khd->qhd", torch.softmax(att, -1), v).reshape(T, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        if qwen and qwen2_layer_is_sparse(cfg, i):
            x = x + qwen2_moe(cfg, w, p + "mlp.", h)
            continue
        if not qwen and cfg.get("num_local_experts"):
            x = x + mixtral_moe(cfg, w, p + "block_sparse_moe.", h)
            continue
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else w["lm_head.weight"]
    return x @ head.T  # [T, vocab]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    w = load_safetensors(os.path.join(a.model, "model.safetensors"))
    ids = [int(t) for t in a.prompt_ids.split(",")]
    tokens, rows = [], []
    with torch.no_grad():
        for _ in range(a.steps):
            logits = forward(cfg, w, ids)[-1]
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            rows.append(logits.tolist())
            ids.append(nxt)
    with open(a.out, "w") as f:
        json.dump({"tokens": tokens, "logits": rows}, f)


if __name__ == "__main__":
    main()
