"""Lean RMSNorm: transformers' numbers, without the fp32 copy of the input kept for the backward."""
from __future__ import annotations

import importlib

import pytest
import torch

from dstune.engine.lean_norm import LLAMA_STYLE_RMSNORMS, lean_rms_norm

MODULES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3",
           "Phi3RMSNorm": "phi3"}


def test_every_listed_class_is_known():
    assert set(LLAMA_STYLE_RMSNORMS) == set(MODULES)


@pytest.mark.parametrize("name", LLAMA_STYLE_RMSNORMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_same_output_and_gradients_as_transformers(name, dtype, tol):
    cls = getattr(importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}"), name)
    torch.manual_seed(0)
    norm = cls(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 48) * 3 + 0.5).to(dtype)
    grad = torch.randn(3, 7, 48).to(dtype)
    results = []
    for forward in (norm.forward, lambda h: lean_rms_norm(norm, h)):
        norm.weight.grad = None
        xi = x.clone().requires_grad_(True)
        out = forward(xi)
        out.backward(grad)
        results.append((out, xi.grad, norm.weight.grad))
    (o0, gx0, gw0), (o1, gx1, gw1) = results
    assert torch.equal(o0, o1)  # the forward is the same arithmetic, op for op
    assert gx1.dtype == gx0.dtype and gw1.dtype == gw0.dtype
    for a, b in ((gx0, gx1), (gw0, gw1)):
        assert ((a.float() - b.float()).norm() / a.float().norm()) < tol


def test_frozen_weight_gets_no_gradient():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(16).requires_grad_(False)
    x = torch.randn(2, 16, requires_grad=True)
    lean_rms_norm(norm, x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None
