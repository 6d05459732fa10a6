"""Lean activations: transformers' numbers, without the redundant copies kept for the backward."""
from __future__ import annotations

import importlib

import pytest
import torch

from dstune.families import FAMILIES
from dstune.models.lean_activations import (LLAMA_STYLE_MLPS, LLAMA_STYLE_RMSNORMS, lean_rms_norm, lean_swiglu_mlp,
                                            use_lean_activations)



def _class(name: str):
    """A norm or MLP class the family table names, from its family's transformers module."""
    family = next(f.model_type for f in FAMILIES.values() if name in (f.rmsnorm, f.swiglu_mlp))
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


def _grads(module: torch.nn.Module, forward, x: torch.Tensor, grad: torch.Tensor):
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = forward(xi)
    out.backward(grad)
    return out, xi.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name", LLAMA_STYLE_RMSNORMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_same_output_and_gradients_as_transformers(name, dtype, tol):
    torch.manual_seed(0)
    norm = _class(name)(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 48) * 3 + 0.5).to(dtype)
    grad = torch.randn(3, 7, 48).to(dtype)
    o0, gx0, (gw0,) = _grads(norm, norm.forward, x, grad)
    o1, gx1, (gw1,) = _grads(norm, lambda h: lean_rms_norm(norm, h), x, grad)
    assert torch.equal(o0, o1)  # the forward is the same arithmetic, op for op
    assert gx1.dtype == gx0.dtype and gw1.dtype == gw0.dtype
    for a, b in ((gx0, gx1), (gw0, gw1)):
        assert ((a.float() - b.float()).norm() / a.float().norm()) < tol


@pytest.mark.parametrize("name", LLAMA_STYLE_MLPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_bitwise_the_same_output_and_gradients_as_transformers(name, dtype):
    from transformers import LlamaConfig
    torch.manual_seed(0)
    mlp = _class(name)(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")).to(dtype)
    x, grad = torch.randn(2, 5, 32).to(dtype), torch.randn(2, 5, 32).to(dtype)
    o0, gx0, gw0 = _grads(mlp, mlp.forward, x, grad)
    o1, gx1, gw1 = _grads(mlp, lambda h: lean_swiglu_mlp(mlp, h), x, grad)
    assert torch.equal(o0, o1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(gw0, gw1))


def test_only_silu_mlps_and_llama_style_norms_are_replaced():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)
    assert use_lean_activations(LlamaForCausalLM(LlamaConfig(**config))) == {"rmsnorm": 5, "swiglu": 2}
    assert use_lean_activations(LlamaForCausalLM(LlamaConfig(**config, hidden_act="gelu"))) == {"rmsnorm": 5,
                                                                                                 "swiglu": 0}


def test_frozen_weight_gets_no_gradient():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(16).requires_grad_(False)
    x = torch.randn(2, 16, requires_grad=True)
    lean_rms_norm(norm, x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None


@pytest.mark.parametrize("weight_trains", [True, False])
def test_rmsnorm_on_cuda_runs_the_fused_kernels_and_keeps_only_input_and_rstd(weight_trains):
    """The CUDA branch on fake CUDA tensors (no GPU needed; the autograd engine would want a device, so the
    function's forward and backward are called directly): the kernels it runs, what it saves, what it returns."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dstune.models.lean_activations import _LeanRMSNorm
    ops = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    class Ctx:  # what autograd hands the function
        needs_input_grad = (True, weight_trains, False)

        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    ctx = Ctx()
    with FakeTensorMode():
        x = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
        weight = torch.ones(64, device="cuda", dtype=torch.bfloat16)
        with Ops():
            out = _LeanRMSNorm.forward(ctx, x, weight, 1e-5)
            grad_x, grad_w, _ = _LeanRMSNorm.backward(ctx, torch.ones_like(out))
        assert [(tuple(t.shape), t.dtype) for t in ctx.saved_tensors] == [
            ((4, 8, 64), torch.bfloat16), ((64,), torch.bfloat16), ((4, 8, 1), torch.float32)]
        assert out.shape == grad_x.shape == x.shape and out.dtype == grad_x.dtype == torch.bfloat16
        assert (grad_w is not None) == weight_trains
    # a CUDA build runs the forward as one kernel; this CPU build decomposes the same op into its maths
    assert ops.count("_fused_rms_norm_backward") == 1 and "pow" not in ops[ops.index("_fused_rms_norm_backward"):]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fused_on_cuda_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    norm = LlamaRMSNorm(2048, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(4, 128, 2048) * 3 + 0.5).to(dtype)
    grad = torch.randn(4, 128, 2048).to(dtype)
    o0, gx0, (gw0,) = _grads(norm, norm.forward, x, grad)
    norm = norm.cuda()
    o1, gx1, (gw1,) = _grads(norm, lambda h: lean_rms_norm(norm, h), x.cuda(), grad.cuda())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in ((o0, o1), (gx0, gx1), (gw0, gw1)):
        assert ((a.float() - b.float().cpu()).norm() / a.float().norm()) < tol
