"""Kernels behind dstune's hot paths. Each has a pure-PyTorch reference that runs everywhere."""
from __future__ import annotations

from dstune.kernels.reference import prefix_attention_reference


def prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=None, causal=True, scale=None, position_bias=None,
                     dropout=0.0):
    """Attention with a learned key/value prefix shared by the batch; see `prefix_attention_reference`."""
    return prefix_attention_reference(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, position_bias, dropout)
