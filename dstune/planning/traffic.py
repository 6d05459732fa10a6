"""FLOPs and bytes of one training step, per operator: where a step's time must go, without a GPU.

A dispatch mode counts every aten operator that makes a tensor, once: its FLOPs (torch's flop counter
formulas; fused attention 4·B·H·Sq·Sk·D forward, halved when causal, 2.5x that backward) and the bytes
it reads and writes (its tensor inputs and outputs; views move nothing). With a device's matmul and
memory ceilings this gives a roofline floor per operator, max(FLOPs / peak, bytes / bandwidth). Run on
fake tensors (`fake_training_model`) it costs seconds for a 1B model and follows the model's real code,
methods included (`benchmarks/step_traffic.py`).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

# aliases, and allocations that write nothing: they move no data
FREE = {torch.ops.aten.detach.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.empty.memory_format,
        torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty.default,
        torch.ops.aten.new_empty_strided.default}


def attention_flops(name: str, args: tuple) -> int:
    """FLOPs of a fused attention call (forward: q, k, v first; backward: dout, q, k, v), causal-aware."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    backward = "backward" in name
    q, k = tensors[1:3] if backward else tensors[:2]
    B, H, Sq, D = q.shape
    flops = 4 * B * H * Sq * k.shape[2] * D
    if next((a for a in args if isinstance(a, bool)), False):  # is_causal: the first bool argument
        flops //= 2
    return flops * 5 // 2 if backward else flops


class StepTraffic(TorchDispatchMode):
    """FLOPs, bytes and calls per (phase, operator); set `phase` between the forward and the backward."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # flops, bytes, calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off inside: what func calls is not counted again
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func.is_view or func in FREE or not outs:
            return out
        name = func.__name__.split(".")[0]
        if "scaled_dot_product" in name:
            flops = attention_flops(name, args)
        elif func._overloadpacket in flop_registry:
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        else:
            flops = 0
        row = self.rows[self.phase, name]
        row[0] += flops
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        row[1] += sum(t.numel() * t.element_size() for t in ins + outs)
        row[2] += 1
        return out

    def total(self, phase: str, column: int, ops: set[str] | None = None) -> int:
        """Sum of one column (0 FLOPs, 1 bytes, 2 calls) over a phase's operators (or some of them)."""
        return sum(r[column] for (p, op), r in self.rows.items() if p == phase and (ops is None or op in ops))


def recipe_traffic(recipe: Path, methods: list[dict], overrides: list[str] = ()) -> StepTraffic:
    """One training step of a recipe with these methods, counted on fake tensors."""
    from dstune.config import load_config
    from dstune.planning.activations import run_step
    from dstune.planning.estimate import fake_training_model

    cfg = load_config(recipe, [f"methods={json.dumps(methods)}", *overrides])
    traffic = StepTraffic()
    with fake_training_model(cfg, cfg.training.micro_batch_size, cfg.data.max_length) as (model, batch):
        run_step(model, batch, traffic, lambda: setattr(traffic, "phase", "backward"))
    return traffic
