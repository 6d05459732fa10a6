"""The CUDA prefix-attention kernel (csrc/prefix_attention.cu) as a torch custom op with autograd.

`dstune::prefix_attention(q, k, v, prefix_k, prefix_v, key_valid, causal, scale) -> (out, lse)`:
q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D], prefix_k/v [Hkv,P,D] shared by the batch, key_valid uint8 [B,Sk] or
None; out [B,Sq,Hq,D] (what attention layers return), lse [B,Hq,Sq] fp32. The backward returns the
prefix gradients already summed over the batch. bf16/fp16, head dim 64 or 128, sm_80+.
"""
from __future__ import annotations

import torch

from dstune.kernels.build import load

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)


def _ext():
    return load("dstune_prefix_attention")


def _stream(t: torch.Tensor) -> int:
    """The current stream of t's device, as the raw handle the extension launches on."""
    return torch.cuda.current_stream(t.device).cuda_stream


@torch.library.custom_op("dstune::prefix_attention", mutates_args=())
def prefix_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                        prefix_v: torch.Tensor, key_valid: torch.Tensor | None, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.cuda.device(q.device):
        out, lse = _ext().forward(q, k, v, prefix_k, prefix_v, key_valid, causal, scale, _stream(q))
    return out, lse


@prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_valid, causal, scale):
    B, Hq, Sq, D = q.shape
    return q.new_empty(B, Sq, Hq, D), q.new_empty(B, Hq, Sq, dtype=torch.float32)


@torch.library.custom_op("dstune::prefix_attention_backward", mutates_args=())
def prefix_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 prefix_k: torch.Tensor, prefix_v: torch.Tensor, out: torch.Tensor,
                                 lse: torch.Tensor, key_valid: torch.Tensor | None, causal: bool,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    with torch.cuda.device(q.device):
        dq, dk, dv, dpk, dpv = _ext().backward(dout, q, k, v, prefix_k, prefix_v, out, lse, key_valid, causal, scale,
                                               _stream(q))
    return dq, dk, dv, dpk, dpv


@prefix_attention_backward_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, out, lse, key_valid, causal, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_valid, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_valid, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, key_valid, out, lse = ctx.saved_tensors
    grads = prefix_attention_backward_op(dout.contiguous(), q, k, v, prefix_k, prefix_v, out, lse, key_valid,
                                         ctx.causal, ctx.scale)
    return (*grads, None, None, None)


prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, prefix_k: torch.Tensor, causal: bool,
                       position_bias, dropout: float) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    if not q.is_cuda:
        return "not on CUDA"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (kernel: bf16, fp16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (kernel: 64, 128)"
    if position_bias is not None:
        return "position bias (T5)"
    if dropout:
        return "attention dropout"
    if q.shape[1] % k.shape[1]:
        return "query heads not a multiple of KV heads"
    if causal and k.shape[2] < q.shape[2]:
        return "fewer keys than queries"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "GPU older than sm_80"
    return None


def key_padding(attn_mask: torch.Tensor | None, q_len: int, k_len: int,
                causal: bool) -> tuple[bool, torch.Tensor | None]:
    """Express an attention mask as (True, key_valid [B or 1, Sk] or None), or (False, None) if it is not
    "causal and/or key padding" (packed-sequence or sliding-window masks go to the reference).

    Accepts HF's boolean masks [B or 1, 1, Sq, Sk]; the check reads the mask once and builds nothing of
    size B x Sq x Sk beyond the comparison.
    """
    if attn_mask is None:
        return True, None
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1 \
            or attn_mask.shape[-2:] != (q_len, k_len):
        return False, None
    mask = attn_mask[:, 0]
    key_valid = mask.any(dim=1)  # under causal + padding, a real key is seen by some query
    expected = key_valid[:, None, :]
    if causal:
        expected = expected & torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
    if not torch.equal(mask, expected.expand_as(mask)):
        return False, None
    return True, key_valid.to(torch.uint8).contiguous()
