#!/usr/bin/env python3
"""Independent PyTorch reference for parallm's mixture-of-experts training (issue 13, item 6).

A Mixtral-style model (config.json with num_local_experts) run in float64 under autograd, written
from the formulas (the transformers package is not used):
  - the decoder is llama_ref.py's (RMSNorm, RoPE, causal GQA attention), each MLP replaced by the
    sparse MoE block: router logits = h . Wg^T, softmax over all E, the top-k, their weights
    renormalised to sum to 1, out = sum over the k experts of weight x w2(silu(w1 h) * w3 h);
  - the load-balancing loss as Hugging Face's load_balancing_loss_func: every MoE layer's router
    logits of the forward concatenated ([layers x tokens, E]), routing_weights = softmax,
    the top-k of them one-hot ([N, k, E]), tokens_per_expert = its mean over N ([k, E]),
    router_prob_per_expert = the mean of routing_weights over N ([E]),
    aux = E * sum(tokens_per_expert * router_prob_per_expert); the selection is not
    differentiated (one_hot of indices), the probabilities are.
A step of G sequences in micro-batches of M (the documented data order, docs/training.md):
  loss = (sum of the G*S cross-entropies) / (G*S)  +  coef * mean over the G/M micro-batches of
  aux(micro-batch), coef = router_aux_loss_coef (config.json; default 0.001),
which is what gradient accumulation over Hugging Face's per-forward loss (loss / micro-batches)
gives.

Writes a .safetensors file of F64 tensors: "loss" [1] (the LM loss alone), "aux" [1] (the mean
of the micro-batches' aux losses, before coef) and "grad/<name>" for every parameter (the
gradient of the whole step's loss).

Usage: moe_train_ref.py --model DIR --data F.bin --seq-len S --global-batch-size G
                        --micro-batch-size M --out OUT.safetensors
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402
import train_ref  # noqa: E402


def moe_block(cfg, w, p, h, gate_logits):
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    logits = h @ w[p + "gate.weight"].T  # [T, E]
    gate_logits.append(logits)
    probs = torch.softmax(logits, dim=-1)
    top_w, top_e = torch.topk(probs, k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(h)
    for e in range(E):
        # gate[t]: token t's weight for expert e (0 when e is not among its top k).
        gate = (top_w * (top_e == e).to(h.dtype)).sum(dim=-1, keepdim=True)
        q = f"{p}experts.{e}."
        a = torch.nn.functional.silu(h @ w[q + "w1.weight"].T) * (h @ w[q + "w3.weight"].T)
        out = out + gate * (a @ w[q + "w2.weight"].T)
    return out


def forward(cfg, w, ids, gate_logits):
    """One sequence's logits [T, vocab]; appends each layer's router logits to gate_logits."""
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg["head_dim"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    T = len(ids)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    ang = llama_ref.rope_tables(cfg, torch.arange(T))
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    inter = cfg.get("rope_interleaved", False)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = llama_ref.rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        q, k, v = q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd)
        q, k = llama_ref.apply_rope(q, ang, inter), llama_ref.apply_rope(k, ang, inter)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        o = torch.einsum("hqk,khd->qhd", torch.softmax(att, -1), v).reshape(T, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = llama_ref.rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + moe_block(cfg, w, p + "block_sparse_moe.", h, gate_logits)
    x = llama_ref.rms_norm(x, w["model.norm.weight"], eps)
    tied = cfg.get("tie_word_embeddings", False)
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return x @ head.T


def load_balancing_loss(gate_logits, E, k):
    """Hugging Face's load_balancing_loss_func without an attention mask."""
    concatenated = torch.cat(gate_logits, dim=0)  # [N, E]
    routing_weights = torch.softmax(concatenated, dim=-1)
    _, selected = torch.topk(routing_weights, k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected, E)  # [N, k, E]
    tokens_per_expert = torch.mean(expert_mask.to(routing_weights.dtype), dim=0)  # [k, E]
    router_prob_per_expert = torch.mean(routing_weights, dim=0)  # [E]
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * E


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--global-batch-size", type=int, required=True)
    ap.add_argument("--micro-batch-size", type=int, required=True)
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg, params = train_ref.load_model(a.model)
    if not cfg.get("num_local_experts"):
        sys.exit("moe_train_ref.py: the model has no num_local_experts")
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    coef = cfg.get("router_aux_loss_coef", 0.001)
    tokens = train_ref.load_tokens(a.data, "u16")
    S, G, M = a.seq_len, a.global_batch_size, a.micro_batch_size
    inputs, targets = train_ref.batch(tokens, S, G, a.step)
    ce_total, aux_total = None, None
    for m in range(G // M):
        gate_logits = []
        for i in range(m * M, (m + 1) * M):
            logits = forward(cfg, params, [int(t) for t in inputs[i]], gate_logits)
            ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets[i]),
                                                   reduction="sum")
            ce_total = ce if ce_total is None else ce_total + ce
        # All of the micro-batch's tokens of every layer, as one forward of the micro-batch gives.
        aux = load_balancing_loss(gate_logits, E, k)
        aux_total = aux if aux_total is None else aux_total + aux
    lm = ce_total / (G * S)
    aux_mean = aux_total / (G // M)
    loss = lm + coef * aux_mean
    loss.backward()
    out = {"loss": np.array([lm.item()]), "aux": np.array([aux_mean.item()])}
    for name, p in params.items():
        out["grad/" + name] = p.grad.detach().numpy()
    train_ref.write_f64_safetensors(a.out, out)


if __name__ == "__main__":
    main()
