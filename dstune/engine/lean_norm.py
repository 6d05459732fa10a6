"""RMSNorm that keeps its input in the training dtype for the backward instead of an fp32 copy.

transformers' Llama-family RMSNorm upcasts its input to fp32, and autograd keeps that copy (4 bytes per
element) and, when the weight trains, the normalised values in the input dtype (2 more in bf16): twice
per layer. This one keeps the input as it came and one fp32 rstd per token, and recomputes the rest in
the backward. The forward is the same arithmetic, op for op; the backward is the same maths in fp32.
"""
from __future__ import annotations

import functools

import torch

# transformers classes whose forward is exactly `weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)`
LLAMA_STYLE_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
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


def use_lean_rmsnorm(model: torch.nn.Module) -> int:
    """Route every Llama-style RMSNorm of `model` through `lean_rms_norm`; returns how many."""
    norms = [m for m in model.modules() if type(m).__name__ in LLAMA_STYLE_RMSNORMS]
    for m in norms:
        m.forward = functools.partial(lean_rms_norm, m)
    return len(norms)
