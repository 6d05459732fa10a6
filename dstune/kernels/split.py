"""Prefix attention as two fused attentions merged by their log-sum-exp (no concatenation, no mask).

Softmax over "prefix keys, then causal sequence keys" splits into two attentions over disjoint key sets:
the sequence part is plain causal attention (the exact call plain SDPA makes: cuDNN on an H100, flash
attention on an A100, flash on CPU) and the prefix part is a small non-causal attention of every query
over the P prefix keys. Each returns its output and per-row log-sum-exp; the merged row is

    lse = logaddexp(lse_seq, lse_prefix)        out = lerp(out_seq, out_prefix, exp(lse_prefix - lse))

The backward calls each fused backward with the merged output and log-sum-exp (the softmax
probabilities of each part are exp(s - lse) with the merged lse, and rowsum(dout * out) uses the merged
output), so both parts get exact gradients, as ring attention does for its blocks. The prefix gradient
comes per batch row and is summed here.

Only for q and k/v of one length with no mask, bias or dropout, and only where SDPA itself would pick
a fused kernel for both parts (`split_backends` says which); the caller falls back otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

aten = torch.ops.aten
_CUDNN, _FLASH = 3, 1  # torch.nn.attention.SDPBackend values returned by aten._fused_sdp_choice


@dataclass(frozen=True)
class FusedAttention:
    """One fused SDPA kernel pair that exposes the log-sum-exp: forward -> (out, lse, state)."""
    name: str
    forward: Callable
    backward: Callable  # (dout, q, k, v, out, lse, state, causal, scale) -> (dq, dk, dv)


def _cudnn_forward(q, k, v, causal, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse, (seed, offset, cum_q, cum_k, max_q, max_k)


def _cudnn_backward(dout, q, k, v, out, lse, state, causal, scale):
    seed, offset, cum_q, cum_k, max_q, max_k = state
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)


def _flash_forward(q, k, v, causal, scale):
    out, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, rng, unused)


def _flash_backward(dout, q, k, v, out, lse, state, causal, scale):
    cum_q, cum_k, max_q, max_k, rng, unused = state
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng, unused, scale=scale)


def _cpu_forward(q, k, v, causal, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, ()


def _cpu_backward(dout, q, k, v, out, lse, state, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                       scale=scale)


CUDNN = FusedAttention("cuDNN", _cudnn_forward, _cudnn_backward)
FLASH = FusedAttention("flash", _flash_forward, _flash_backward)
CPU_FLASH = FusedAttention("CPU flash", _cpu_forward, _cpu_backward)


def fused_backend(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None) -> FusedAttention | None:
    """The fused kernel plain SDPA would run for these shapes, if it is one that returns its log-sum-exp."""
    choice = aten._fused_sdp_choice(q, k, k, None, 0.0, causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if choice == _CUDNN:
        return CUDNN
    if choice == _FLASH:
        return FLASH if q.is_cuda else CPU_FLASH
    return None


def split_backends(q: torch.Tensor, k: torch.Tensor, prefix_k: torch.Tensor, causal: bool,
                   scale: float | None) -> tuple[FusedAttention, FusedAttention] | None:
    """Fused kernels for the sequence part and the prefix part, or None when either would not be fused."""
    main = fused_backend(q, k, causal, scale)
    prefix = fused_backend(q, _in_batch(prefix_k, q), False, scale)
    return (main, prefix) if main and prefix else None


def _in_batch(prefix: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The shared prefix [H, P, D] over q's batch, as a view (`.contiguous()` makes the copies)."""
    return prefix.to(q.dtype)[None].expand(q.shape[0], -1, -1, -1)


def _rows(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A kernel's log-sum-exp as fp32 [B, H, S, 1] (cuDNN returns [B,H,S,1], flash [B,H,S])."""
    return lse.float().reshape(q.shape[0], q.shape[1], q.shape[2], 1)


class _SplitPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, main, prefix, causal, scale):
        B, H, S, D = q.shape
        # one copy per batch row: fused kernels want a dense batch, and P is small
        pk, pv = _in_batch(prefix_k, q).contiguous(), _in_batch(prefix_v, q).contiguous()
        out_seq, lse_seq, state_seq = main.forward(q, k, v, causal, scale)
        out_pre, lse_pre, state_pre = prefix.forward(q, pk, pv, False, scale)
        l_seq, l_pre = _rows(lse_seq, q), _rows(lse_pre, q)
        lse = torch.logaddexp(l_seq, l_pre)
        # [B, S, H, D] is what attention layers return; writing the merge there saves a transpose copy
        merged = q.new_empty(B, S, H, D)
        out = merged.transpose(1, 2)
        torch.lerp(out_seq, out_pre, torch.sigmoid(l_pre - l_seq).to(q.dtype), out=out)
        tensors = [t for t in (*state_seq, *state_pre) if isinstance(t, torch.Tensor)]
        ctx.save_for_backward(q, k, v, pk, pv, merged, lse, *tensors)  # the output itself, not a view of it
        ctx.meta = (main, prefix, causal, scale, lse_seq.shape, lse_pre.shape, state_seq, state_pre)
        return merged

    @staticmethod
    def backward(ctx, dmerged):
        q, k, v, pk, pv, merged, lse, *tensors = ctx.saved_tensors
        out = merged.transpose(1, 2)
        main, prefix, causal, scale, shape_seq, shape_pre, state_seq, state_pre = ctx.meta
        it = iter(tensors)  # saved tensors back into the states, in order; ints stay as they were
        state_seq = tuple(next(it) if isinstance(t, torch.Tensor) else t for t in state_seq)
        state_pre = tuple(next(it) if isinstance(t, torch.Tensor) else t for t in state_pre)
        dout = dmerged.contiguous().transpose(1, 2)  # the same strides as `out`, as the kernels expect
        dq, dk, dv = main.backward(dout, q, k, v, out, lse.reshape(shape_seq).contiguous(), state_seq,
                                   causal, scale)
        dq_pre, dpk, dpv = prefix.backward(dout, q, pk, pv, out, lse.reshape(shape_pre).contiguous(), state_pre,
                                           False, scale)
        return dq.add_(dq_pre), dk, dv, dpk.sum(0), dpv.sum(0), None, None, None, None  # dq is the kernel's own


def prefix_attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                           prefix_v: torch.Tensor, backends: tuple[FusedAttention, FusedAttention],
                           causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Prefix attention of q [B,Hq,S,D] over prefix_k/v [Hkv,P,D] then causal k/v [B,Hkv,S,D]; [B,S,Hq,D].

    `backends` comes from `split_backends` (None there means: use another path).
    """
    return _SplitPrefixAttention.apply(q, k, v, prefix_k.to(q.dtype), prefix_v.to(q.dtype), *backends, causal,
                                       scale)

