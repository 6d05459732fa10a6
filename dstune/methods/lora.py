"""LoRA: a trainable low-rank update B·A beside frozen linear layers; mergeable into the base weights."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dstune.families import default_targets
from dstune.methods.base import TuningMethod
from dstune.methods.peft_format import PeftAdapter, fan_in_fan_out, layer_tensors
from dstune.methods.targets import find_linears, linear_shape, train_task_head


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(8.0, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names (suffix match) or 'all-linear'; default: the family's (PEFT's where it has one)")


class LoraUp(nn.Linear):
    """LoRA's B, which adds its scaled output to the base layer's: `base + scaling · (xa @ Bᵀ)` is one addmm.

    The update is added in the matmul's epilogue, so it is never written out on its own and read back
    (two passes over the layer's output), and its gradient needs no scaled copy of the output gradient
    (addmm scales the small rank-r products instead): four fewer passes over a [tokens, out] tensor per
    layer and step. The weight is an ordinary Linear weight (state dicts, PEFT export and merging see
    `lora_B.weight`), and it is called as a module, so ZeRO-3 gathers it like any layer.
    """

    def forward(self, xa: torch.Tensor, base: torch.Tensor, scaling: float) -> torch.Tensor:
        rows = torch.addmm(base.reshape(-1, base.shape[-1]), xa.reshape(-1, xa.shape[-1]).to(base.dtype),
                           self.weight.to(base.dtype).t(), alpha=scaling)
        return rows.view(base.shape)


def _lora_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # submodules are called (not their weights read) so ZeRO-3 gathers them like any layer
    x = module.lora_dropout(args[0])
    return module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype)), output, module.lora_scaling)


class Lora(TuningMethod):
    name = "lora"
    description = "LoRA: low-rank updates B·A on chosen linear layers (PEFT-compatible, mergeable)"
    Options = LoraOptions

    def apply(self, model: nn.Module, task: str) -> None:
        o = self.options
        self.targets = o.target_modules or list(default_targets(model, self.name, "lora"))
        self.wrapped: list[str] = []
        for name, module in list(find_linears(model, self.targets)):
            d_in, d_out = linear_shape(module)
            module.lora_A = nn.Linear(d_in, o.r, bias=False)
            module.lora_B = LoraUp(o.r, d_out, bias=False)
            nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))  # as PEFT: A random, B zero
            nn.init.zeros_(module.lora_B.weight)
            module.lora_dropout = nn.Dropout(o.dropout) if o.dropout else nn.Identity()
            module.lora_scaling = o.alpha / o.r
            module.register_forward_hook(_lora_forward)
            self.wrapped.append(name)
        train_task_head(model, task)

    def merged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Base weights with the update folded in: W + (alpha/r)·B·A (transposed for GPT-2's Conv1D)."""
        out = {}
        for name in self.wrapped:
            m = model.get_submodule(name)
            delta = (m.lora_B.weight @ m.lora_A.weight) * m.lora_scaling
            out[f"{name}.weight"] = m.weight.detach() + (delta if isinstance(m, nn.Linear) else delta.T)
        return out

    def peft_adapter(self, model: nn.Module, task: str) -> PeftAdapter:
        o = self.options   # x.lora_A.weight is PEFT's saved name too
        return PeftAdapter({"peft_type": "LORA", "r": o.r, "lora_alpha": o.alpha, "lora_dropout": o.dropout,
                            "fan_in_fan_out": fan_in_fan_out(model, self.wrapped), "bias": "none",
                            "init_lora_weights": True, "target_modules": list(self.wrapped)}, layer_tensors(model))

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        return {"lora": [{"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}]}
