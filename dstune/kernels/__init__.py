"""Kernels behind dstune's hot paths. Each has a pure-PyTorch reference that runs everywhere."""
from __future__ import annotations

import logging

from dstune.kernels.reference import (prefix_attention_lower_right, prefix_attention_reference,
                                      prefix_attention_shifted)

log = logging.getLogger(__name__)

# Paths for the inputs they support (the rest take the general paths below); the prefix method's
# `attention` option picks one:
#   auto        - shifted
#   shifted     - plain causal SDPA over P placeholder queries + the sequence, prefix + sequence keys: the
#                 kernel plain attention runs (cuDNN on an H100); on CPU 1.0-1.2x plain (lower-right 1.4-1.7x)
#   lower-right - SDPA over the concatenated prefix with lower-right causality: flash attention on CUDA
#                 (measured on an H100: 1.84-2.14x plain causal SDPA, which runs cuDNN there)
#   split       - two fused attentions merged by log-sum-exp (split.py): plain attention's kernel + the prefix
#   kernel      - the CUDA kernel (csrc/prefix_attention.cu): numerics pass on an H100, far slower than flash.
# benchmarks/prefix_attention.py measures every path on a GPU.
PATHS = ("auto", "shifted", "lower-right", "split", "kernel")
_logged: set[str] = set()


def _path(name: str) -> None:
    if name not in _logged:  # once per path: this runs in every attention layer of every step
        _logged.add(name)
        log.debug("prefix attention: %s", name)


def prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=None, causal=True, scale=None, position_bias=None,
                     dropout=0.0, path: str = "auto"):
    """Attention with a learned key/value prefix shared by the batch; see `prefix_attention_reference`.

    Returns [B, S, Hq, D]. Runs `path` (one of PATHS) when it supports the inputs; else, for sequences
    without a mask or bias (training on full blocks), the shifted path; else the general reference. Debug
    logs say which path ran and why.
    """
    if path not in PATHS:
        raise ValueError(f"prefix_attention: path must be one of {', '.join(PATHS)}, got {path!r}")
    unmasked = attn_mask is None and position_bias is None and q.shape[2] == k.shape[2]
    if path == "split":
        from dstune.kernels.split import prefix_attention_split, split_backends
        backends = split_backends(q, k, prefix_k, causal, scale) if unmasked and not dropout else None
        if backends is not None:
            _path(f"split: {backends[0].name} (sequence) + {backends[1].name} (prefix), merged by log-sum-exp")
            return prefix_attention_split(q, k, v, prefix_k, prefix_v, backends, causal, scale)
        _path("split skipped (a mask, a bias, a cache, dropout, or no fused kernel for the shapes)")
    if path == "kernel" and q.is_cuda:
        from dstune.kernels.prefix_cuda import key_padding, prefix_attention_op, unsupported_reason
        reason = unsupported_reason(q, k, prefix_k, causal, position_bias, dropout)
        if reason is None:
            ok, key_valid = key_padding(attn_mask, q.shape[2], k.shape[2], causal)
            if ok:
                if key_valid is not None:
                    key_valid = key_valid.expand(q.shape[0], -1).contiguous()
                _path("CUDA kernel")
                out, _ = prefix_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), prefix_k.contiguous(),
                                             prefix_v.contiguous(), key_valid, causal,
                                             scale if scale is not None else q.shape[-1] ** -0.5)
                return out
            reason = "mask is not causal + key padding"
        _path(f"CUDA kernel skipped ({reason})")
    if unmasked and path == "lower-right":
        _path("SDPA, lower-right causal (no mask)")
        return prefix_attention_lower_right(q, k, v, prefix_k, prefix_v, causal, scale, dropout)
    if unmasked:
        _path("SDPA, causal over P placeholder queries + the sequence (no mask)")
        return prefix_attention_shifted(q, k, v, prefix_k, prefix_v, causal, scale, dropout)
    _path("reference (a mask, a position bias or a cache)")
    return prefix_attention_reference(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, position_bias, dropout)
