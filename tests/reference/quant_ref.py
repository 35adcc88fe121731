#!/usr/bin/env python3
"""An independent numpy implementation of llama.cpp's block formats (ggml's published layouts).

    quant_ref.py dequant TYPE IN OUT   IN: raw blocks of TYPE (q8_0, q4_0, q4_k, q5_k, q6_k);
                                       OUT: the values as little-endian f32
    quant_ref.py quant TYPE IN OUT     IN: little-endian f32 values (a multiple of 32);
                                       OUT: raw blocks of TYPE (q8_0 or q4_0), the reference
                                       quantizer of llama.cpp (ggml-quants.c's *_ref functions)

Written from the layout descriptions, vectorised over blocks with numpy structured dtypes; all
arithmetic in float32 in the C reference's order, so results are bit-exact.
"""
import sys

import numpy as np

F32 = np.float32

Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                 ("qs", "u1", 128)])
Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
TYPES = {"q8_0": Q8_0, "q4_0": Q4_0, "q4_k": Q4_K, "q5_k": Q5_K, "q6_k": Q6_K}
assert (Q8_0.itemsize, Q4_0.itemsize, Q4_K.itemsize, Q5_K.itemsize, Q6_K.itemsize) == (
    34, 18, 144, 176, 210)


def f16(a):
    return a.astype(F32)


def dequant_q8_0(b):
    return (b["qs"].astype(F32) * f16(b["d"])[:, None]).reshape(-1)


def dequant_q4_0(b):
    lo = (b["qs"] & 0x0F).astype(np.int32) - 8
    hi = (b["qs"] >> 4).astype(np.int32) - 8
    q = np.concatenate([lo, hi], axis=1).astype(F32)  # elements 0..15 low, 16..31 high
    return (q * f16(b["d"])[:, None]).reshape(-1)


def q4k_scales_mins(s):
    """[nb, 12] packed bytes -> ([nb, 8] scales, [nb, 8] mins), 6 bits each."""
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    mn = np.empty((s.shape[0], 8), np.int32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def dequant_q4_k(b):
    nb = b.shape[0]
    sc, mn = q4k_scales_mins(b["scales"])
    d = f16(b["d"])[:, None] * sc.astype(F32)  # [nb, 8]
    m = f16(b["dmin"])[:, None] * mn.astype(F32)
    qs = b["qs"].reshape(nb, 4, 32)  # four 32-byte groups, each two sub-blocks
    q = np.empty((nb, 8, 32), F32)
    q[:, 0::2, :] = (qs & 0xF).astype(F32)
    q[:, 1::2, :] = (qs >> 4).astype(F32)
    return (d[:, :, None] * q - m[:, :, None]).reshape(-1)


def dequant_q5_k(b):
    """Q4_K's scales, mins and nibbles, plus a fifth bit: bit j of qh byte l for value l of
    sub-block j."""
    nb = b.shape[0]
    sc, mn = q4k_scales_mins(b["scales"])
    d = f16(b["d"])[:, None] * sc.astype(F32)
    m = f16(b["dmin"])[:, None] * mn.astype(F32)
    qs = b["qs"].reshape(nb, 4, 32).astype(np.int32)
    qh = b["qh"].astype(np.int32)  # [nb, 32]
    high = np.stack([(qh >> j) & 1 for j in range(8)], axis=1)  # [nb, 8, 32]
    q = np.empty((nb, 8, 32), np.int32)
    q[:, 0::2, :] = qs & 0xF
    q[:, 1::2, :] = qs >> 4
    q = (q | (high << 4)).astype(F32)
    return (d[:, :, None] * q - m[:, :, None]).reshape(-1)


def dequant_q6_k(b):
    nb = b.shape[0]
    out = np.empty((nb, 256), F32)
    d = f16(b["d"])
    for half in range(2):
        ql = b["ql"][:, 64 * half:64 * half + 64].astype(np.int32)
        qh = b["qh"][:, 32 * half:32 * half + 32].astype(np.int32)
        sc = b["scales"][:, 8 * half:8 * half + 8].astype(F32)
        qs = [
            (ql[:, 0:32] & 0xF) | (((qh >> 0) & 3) << 4),
            (ql[:, 32:64] & 0xF) | (((qh >> 2) & 3) << 4),
            (ql[:, 0:32] >> 4) | (((qh >> 4) & 3) << 4),
            (ql[:, 32:64] >> 4) | (((qh >> 6) & 3) << 4),
        ]
        for k in range(4):  # values 32k .. 32k+31 of this half: scale index 2k + l // 16
            l16 = np.arange(32) // 16
            s = sc[:, 2 * k + l16]  # [nb, 32]
            out[:, 128 * half + 32 * k:128 * half + 32 * k + 32] = (
                d[:, None] * s * (qs[k] - 32).astype(F32))
    return out.reshape(-1)


DEQUANT = {"q8_0": dequant_q8_0, "q4_0": dequant_q4_0, "q4_k": dequant_q4_k, "q5_k": dequant_q5_k,
           "q6_k": dequant_q6_k}


def round_half_away(v):
    """C's roundf on float32 values (numpy's round is to even)."""
    v64 = v.astype(np.float64)  # |v| + 0.5 is exact in float64
    return (np.sign(v64) * np.floor(np.abs(v64) + 0.5)).astype(np.int32)


def quant_q8_0(x):
    x = x.reshape(-1, 32)
    with np.errstate(divide="ignore"):
        amax = np.abs(x).max(axis=1)
        d = (amax / F32(127)).astype(F32)
        idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    out = np.zeros(x.shape[0], Q8_0)
    out["d"] = d.astype(np.float16)
    out["qs"] = round_half_away((x * idv[:, None]).astype(F32)).astype(np.int8)
    return out


def quant_q4_0(x):
    x = x.reshape(-1, 32)
    idx = np.argmax(np.abs(x), axis=1)  # the first of the largest magnitude, as the C loop's `<`
    mx = x[np.arange(x.shape[0]), idx]
    d = (mx / F32(-8)).astype(F32)
    idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    v = ((x * idv[:, None]).astype(F32) + F32(8.5)).astype(F32)
    q = np.minimum(15, np.trunc(v).astype(np.int32).astype(np.int8).astype(np.int32))
    out = np.zeros(x.shape[0], Q4_0)
    out["d"] = d.astype(np.float16)
    out["qs"] = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)
    return out


QUANT = {"q8_0": quant_q8_0, "q4_0": quant_q4_0}


def main(argv):
    if len(argv) != 5 or argv[1] not in ("dequant", "quant") or argv[2] not in TYPES:
        sys.exit(__doc__)
    mode, t, src, dst = argv[1:]
    data = open(src, "rb").read()
    if mode == "dequant":
        blocks = np.frombuffer(data, TYPES[t])
        out = DEQUANT[t](blocks).astype("<f4")
    else:
        out = QUANT[t](np.frombuffer(data, "<f4").astype(F32))
    open(dst, "wb").write(out.tobytes())


if __name__ == "__main__":
    main(sys.argv)
