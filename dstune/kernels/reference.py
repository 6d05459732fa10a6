"""Pure-PyTorch prefix-KV attention: the general reference (concatenate the prefix, build the mask, call
SDPA) and two paths for unmasked sequences that build no mask: shifted queries (plain causal SDPA) and
lower-right causality (flash attention on CUDA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_mask(attn_mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool,
                  device: torch.device) -> torch.Tensor | None:
    """Boolean (True = attend) or additive float mask over the sequence keys, or None for "all visible".

    HF passes either nothing (plain causal / unpadded), a boolean mask, or an additive float mask.
    A causal mask with fewer queries than keys (decoding with a cache) is aligned bottom-right.
    """
    if attn_mask is not None:
        return attn_mask
    if not causal or q_len == 1:
        return None
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def with_prefix_columns(mask: torch.Tensor | None, n_prefix: int) -> torch.Tensor | None:
    """Prepend `n_prefix` always-visible key columns to a mask."""
    if mask is None:
        return None
    shape = (*mask.shape[:-1], n_prefix)
    visible = torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool \
        else torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask], dim=-1)


def in_front(prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The shared prefix [H, P, D] in front of every batch row of x [B, H, T, D] (the batch expand is a view)."""
    return torch.cat([prefix.to(x.dtype)[None].expand(x.shape[0], -1, -1, -1), x], dim=2)


def prefix_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                               prefix_v: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = True,
                               scale: float | None = None, position_bias: torch.Tensor | None = None,
                               dropout: float = 0.0) -> torch.Tensor:
    """Attention of q [B,Hq,S,D] over prefix_k/v [Hkv,P,D] (shared by the batch) followed by k/v [B,Hkv,T,D].

    The prefix is always visible; the sequence is causal (if `causal`) and masked by `attn_mask`;
    `position_bias` (T5) covers the sequence keys and is 0 for the prefix. Returns [B,S,Hq,D].
    """
    Hq, S = q.shape[1], q.shape[2]
    Hkv, P = prefix_k.shape[0], prefix_k.shape[1]
    keys, values = in_front(prefix_k, k), in_front(prefix_v, v)
    if Hq != Hkv:  # grouped-query attention: each KV head serves Hq/Hkv query heads
        keys = keys.repeat_interleave(Hq // Hkv, dim=1)
        values = values.repeat_interleave(Hq // Hkv, dim=1)
    mask = with_prefix_columns(sequence_mask(attn_mask, S, k.shape[2], causal, q.device), P)
    if position_bias is not None:
        bias = F.pad(position_bias, (P, 0))
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
        else:
            mask = bias + mask
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).contiguous()


def prefix_attention_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                                 prefix_v: torch.Tensor, causal: bool = True, scale: float | None = None,
                                 dropout: float = 0.0) -> torch.Tensor:
    """Prefix attention for sequences with no padding mask (q and k/v of one length S).

    With the P prefix keys in front, "prefix visible, sequence causal" is causality aligned to the
    bottom-right corner of the S x (P+S) score matrix: query i sees keys 0 .. P+i. On CUDA, torch's
    lower-right causal bias hands that to a fused kernel without building a mask (flash attention
    aligns its causal mask that way natively); elsewhere SDPA gets the explicit mask. Returns [B,S,Hq,D].
    """
    Hq, S = q.shape[1], q.shape[2]
    Hkv, P = prefix_k.shape[0], prefix_k.shape[1]
    keys, values = in_front(prefix_k, k), in_front(prefix_v, v)
    mask = None
    if causal:  # the bias object is CUDA dispatch only: a CPU step (or the estimate's fake trace) gets the mask
        from torch.nn.attention.bias import causal_lower_right  # imported here: it pulls in torch._dynamo (2 s)
        mask = causal_lower_right(S, P + S) if q.is_cuda else \
            torch.ones(S, P + S, dtype=torch.bool, device=q.device).tril(P)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale,
                                         enable_gqa=Hq != Hkv)
    return out.transpose(1, 2).contiguous()


def prefix_attention_shifted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                             prefix_v: torch.Tensor, causal: bool = True, scale: float | None = None,
                             dropout: float = 0.0) -> torch.Tensor:
    """Prefix attention for sequences with no padding mask, as plain causal SDPA over P + S rows.

    P placeholder (zero) queries go in front of the S real ones, so the square causal mask over the
    P + S keys lets real query i see keys 0 .. P+i: the whole prefix and the causal sequence. SDPA then
    makes the same call as plain causal attention, P rows longer, and runs the same kernel (cuDNN on an
    H100, where lower-right causality is limited to flash attention). The placeholder rows are dropped;
    their output gets no gradient, so they add nothing to dk, dv or the prefix gradients. Costs one copy
    of q. Returns [B,S,Hq,D].
    """
    B, Hq, S, D = q.shape
    Hkv, P = prefix_k.shape[0], prefix_k.shape[1]
    keys, values = in_front(prefix_k, k), in_front(prefix_v, v)
    if causal:
        q = torch.cat([q.new_zeros(B, Hq, P, D), q], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout, is_causal=causal, scale=scale,
                                         enable_gqa=Hq != Hkv)
    return out[:, :, -S:].transpose(1, 2).contiguous()
