"""The CUDA kernel's algorithm (dstune/kernels/csrc/prefix_attention.cu) step by step in PyTorch.

Same virtual key sequence, same `visible` rule, same tiles, same online softmax and log-sum-exp, same
FlashAttention-2 backward (delta, dS = P (dP - delta) scale, dK/dV per key tile over every query tile
and query head of the group, prefix rows summed over the batch). Tests run it against an independent
float64 implementation, so the algorithm and its index rules are checked on the CPU; the .cu file
transcribes it loop for loop.
"""
from __future__ import annotations

import math

import torch


def visible(b: int, i: torch.Tensor, j: torch.Tensor, Sq: int, Sk: int, P: int, causal: bool,
            key_valid: torch.Tensor | None) -> torch.Tensor:
    """Mask [len(i), len(j)]: may query i see virtual key j of batch row b?"""
    i, j = i[:, None], j[None, :]
    t = j - P
    seq_ok = t < Sk
    if key_valid is not None:
        seq_ok = seq_ok & key_valid[b][t.clamp(0, Sk - 1)].bool()
    if causal:
        seq_ok = seq_ok & (t <= i + (Sk - Sq))
    return (i < Sq) & (j < P + Sk) & ((j < P) | seq_ok)


def virtual_rows(prefix: torch.Tensor, seq: torch.Tensor, j0: int, rows: int) -> torch.Tensor:
    """Rows [j0, j0 + rows) of [prefix; seq], zeros past the end (load_virtual_rows)."""
    P, Sk, D = prefix.shape[0], seq.shape[0], prefix.shape[1]
    out = prefix.new_zeros(rows, D)
    for r in range(rows):
        j = j0 + r
        if j < P:
            out[r] = prefix[j]
        elif j - P < Sk:
            out[r] = seq[j - P]
    return out


def forward(q, k, v, pk, pv, key_valid, causal, scale, BM=4, BN=4):
    """q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D], pk/pv [Hkv,P,D] -> out [B,Sq,Hq,D], lse [B,Hq,Sq]."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, P = k.shape[1], k.shape[2], pk.shape[1]
    out = q.new_zeros(B, Sq, Hq, D)
    lse = q.new_zeros(B, Hq, Sq)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for q0 in range(0, Sq, BM):
                rows = torch.arange(q0, q0 + BM)
                Q = torch.zeros(BM, D, dtype=q.dtype)
                n = min(BM, Sq - q0)
                Q[:n] = q[b, h, q0:q0 + n]
                O = torch.zeros(BM, D, dtype=q.dtype)
                m = torch.full((BM,), -math.inf, dtype=q.dtype)
                lsum = torch.zeros(BM, dtype=q.dtype)
                j_end = P + Sk
                if causal:
                    j_end = min(j_end, P + max(0, q0 + BM + (Sk - Sq)))
                for j0 in range(0, j_end, BN):
                    K = virtual_rows(pk[hk], k[b, hk], j0, BN)
                    V = virtual_rows(pv[hk], v[b, hk], j0, BN)
                    s = (Q @ K.T) * scale
                    vis = visible(b, rows, torch.arange(j0, j0 + BN), Sq, Sk, P, causal, key_valid)
                    new_m = torch.maximum(m, s.masked_fill(~vis, -math.inf).amax(1))
                    e = torch.where(vis, torch.exp(s - new_m[:, None].clamp_min(-1e30)), torch.zeros_like(s))
                    corr = torch.where(m == -math.inf, torch.zeros_like(m), torch.exp(m - new_m))
                    lsum = lsum * corr + e.sum(1)
                    m = new_m
                    O = O * corr[:, None] + e @ V
                for r in range(n):
                    out[b, q0 + r, h] = O[r] / lsum[r] if lsum[r] > 0 else 0
                    lse[b, h, q0 + r] = m[r] + torch.log(lsum[r]) if lsum[r] > 0 else math.inf
    return out, lse


def backward(dout, q, k, v, pk, pv, out, lse, key_valid, causal, scale, BM=4, BN=4):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v); the prefix ones summed over the batch."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, P = k.shape[1], k.shape[2], pk.shape[1]
    group = Hq // Hkv
    delta = (dout * out).sum(-1).transpose(1, 2)  # [B, Hq, Sq]
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
    for b in range(B):
        for hk in range(Hkv):
            for j0 in range(0, P + Sk, BN):
                K = virtual_rows(pk[hk], k[b, hk], j0, BN)
                V = virtual_rows(pv[hk], v[b, hk], j0, BN)
                dK, dV = torch.zeros_like(K), torch.zeros_like(V)
                i_first = max(0, (j0 - P) - (Sk - Sq)) if causal and j0 >= P else 0
                for h in range(hk * group, (hk + 1) * group):
                    for i0 in range((i_first // BM) * BM, Sq, BM):
                        n = min(BM, Sq - i0)
                        Q, dO = torch.zeros(BM, D, dtype=q.dtype), torch.zeros(BM, D, dtype=q.dtype)
                        Q[:n], dO[:n] = q[b, h, i0:i0 + n], dout[b, i0:i0 + n, h]
                        L = torch.full((BM,), math.inf, dtype=q.dtype)
                        dl = torch.zeros(BM, dtype=q.dtype)
                        L[:n], dl[:n] = lse[b, h, i0:i0 + n], delta[b, h, i0:i0 + n]
                        vis = visible(b, torch.arange(i0, i0 + BM), torch.arange(j0, j0 + BN), Sq, Sk, P, causal,
                                      key_valid)
                        prob = torch.where(vis, torch.exp((Q @ K.T) * scale - L[:, None]), torch.zeros(BM, BN))
                        dS = prob * ((dO @ V.T) - dl[:, None]) * scale
                        dV += prob.T @ dO
                        dK += dS.T @ Q
                        dq[b, h, i0:i0 + n] += (dS @ K)[:n]
                for r in range(BN):
                    j = j0 + r
                    if j < P:
                        dpk[hk, j] += dK[r]
                        dpv[hk, j] += dV[r]
                    elif j - P < Sk:
                        dk[b, hk, j - P] = dK[r]
                        dv[b, hk, j - P] = dV[r]
    return dq, dk, dv, dpk, dpv
