"""LoRA: a trainable low-rank update B·A beside frozen linear layers; mergeable into the base weights."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dstune.methods.base import TuningMethod
from dstune.methods.targets import (LORA_TARGETS, family_default, find_linears, linear_shape,
                                    train_task_head)


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(8.0, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names (suffix match) or 'all-linear'; default: PEFT's per-family choice")


def _lora_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # submodules are called (not their weights read) so ZeRO-3 gathers them like any layer
    x = module.lora_dropout(args[0])
    delta = module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype))).to(output.dtype)
    # output + scaling·delta in one elementwise pass (and one rounding), not a scaled copy then a sum
    return torch.add(output, delta, alpha=module.lora_scaling)


class Lora(TuningMethod):
    name = "lora"
    description = "LoRA: low-rank updates B·A on chosen linear layers (PEFT-compatible, mergeable)"
    Options = LoraOptions

    def apply(self, model: nn.Module, task: str) -> None:
        o = self.options
        self.targets = o.target_modules or family_default(LORA_TARGETS, model, self.name)
        self.wrapped: list[str] = []
        for name, module in list(find_linears(model, self.targets)):
            d_in, d_out = linear_shape(module)
            module.lora_A = nn.Linear(d_in, o.r, bias=False)
            module.lora_B = nn.Linear(o.r, d_out, bias=False)
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
