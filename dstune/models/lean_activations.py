"""Keep less for the backward where transformers' Llama-family layers keep redundant copies.

- RMSNorm upcasts its input to fp32, and autograd keeps that copy (4 bytes per element) and, when the
  weight trains, the normalised values in the input dtype (2 more in bf16): twice per layer. The lean
  one keeps the input as it came and one fp32 rstd per token, and recomputes the rest in the backward.
  On CUDA it runs PyTorch's fused RMSNorm kernels (one pass each way, where transformers' forward is
  seven elementwise kernels; the output is rounded to bf16 once instead of twice); elsewhere the same
  forward arithmetic as transformers op for op, and the same backward maths in fp32.
- The SwiGLU MLP `down(silu(gate(x)) * up(x))` keeps gate(x) for the SiLU, and silu(gate(x)) and up(x)
  for the product. The lean one keeps gate(x) and up(x) and recomputes the SiLU in the backward with the
  same kernels: bitwise the same forward and gradients, one intermediate-sized tensor less per layer.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dstune.families import FAMILIES

# transformers classes whose forward is exactly `weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)`
LLAMA_STYLE_RMSNORMS = tuple(f.rmsnorm for f in FAMILIES.values() if f.rmsnorm)
# ... and whose MLP forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, with a SiLU act_fn
LLAMA_STYLE_MLPS = tuple(f.swiglu_mlp for f in FAMILIES.values() if f.swiglu_mlp)
SILU_CLASSES = ("SiLU", "SiLUActivation")


def _fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """PyTorch's fused RMSNorm kernels (forward and backward) exist for these tensors' device and dtypes."""
    return x.is_cuda and weight.dtype == x.dtype and hasattr(torch.ops.aten, "_fused_rms_norm_backward")


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _fused(x, weight):
            out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        else:
            xf = x.to(torch.float32)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        if _fused(x, weight):
            grad_x, grad_w = torch.ops.aten._fused_rms_norm_backward(
                grad.contiguous(), x, [x.shape[-1]], rstd, weight, list(ctx.needs_input_grad[:2]))
            return grad_x, grad_w, None
        xhat = x.to(torch.float32) * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normed = xhat.to(x.dtype).to(torch.float32)  # the forward multiplied the weight by these values
            grad_w = (grad.to(torch.float32) * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def lean_rms_norm(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _LeanRMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)


class _LeanSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def lean_swiglu_mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(_LeanSwiGLU.apply(module.gate_proj(x), module.up_proj(x)))


def use_lean_activations(model: torch.nn.Module) -> dict[str, int]:
    """Route `model`'s Llama-style RMSNorms and SwiGLU MLPs through the lean versions; returns how many."""
    norms = [m for m in model.modules() if type(m).__name__ in LLAMA_STYLE_RMSNORMS]
    mlps = [m for m in model.modules() if type(m).__name__ in LLAMA_STYLE_MLPS
            and type(getattr(m, "act_fn", None)).__name__ in SILU_CLASSES]
    for m in norms:
        m.forward = functools.partial(lean_rms_norm, m)
    for m in mlps:
        m.forward = functools.partial(lean_swiglu_mlp, m)
    return {"rmsnorm": len(norms), "swiglu": len(mlps)}
