"""Kernels behind dstune's hot paths. Each has a pure-PyTorch reference that runs everywhere."""
from __future__ import annotations

import logging
import os

from dstune.kernels.reference import prefix_attention_lower_right, prefix_attention_reference

log = logging.getLogger(__name__)

# DSTUNE_PREFIX_KERNEL=1 sends supported CUDA inputs to the CUDA kernel (csrc/prefix_attention.cu).
# Off by default: its numerics pass on an H100 but it is far slower than flash attention
# (benchmarks/prefix_attention.py measures both).
KERNEL_ENV = "DSTUNE_PREFIX_KERNEL"
_logged: set[str] = set()


def _path(name: str) -> None:
    if name not in _logged:  # once per path: this runs in every attention layer of every step
        _logged.add(name)
        log.debug("prefix attention: %s", name)


def prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=None, causal=True, scale=None, position_bias=None,
                     dropout=0.0):
    """Attention with a learned key/value prefix shared by the batch; see `prefix_attention_reference`.

    Returns [B, S, Hq, D]. Runs the CUDA kernel when it is enabled and supports the inputs; else, for
    sequences without a mask or bias (training on full blocks), SDPA with lower-right causality (flash
    attention on CUDA); else the general reference. Debug logs say which path ran and why.
    """
    if q.is_cuda and os.environ.get(KERNEL_ENV, "0") == "1":
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
    if attn_mask is None and position_bias is None and q.shape[2] == k.shape[2]:
        _path("SDPA, lower-right causal (no mask)")
        return prefix_attention_lower_right(q, k, v, prefix_k, prefix_v, causal, scale, dropout)
    _path("reference (a mask, a position bias or a cache)")
    return prefix_attention_reference(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, position_bias, dropout)
