"""Bottleneck adapters (Houlsby, Pfeiffer): h + W_u σ(W_d h) after a sublayer, W_u zero-initialised."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dstune.errors import UserError
from dstune.families import Family, family_of
from dstune.methods.base import TuningMethod, bypassed
from dstune.methods.targets import matches, train_task_head


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    style: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and MLP; pfeiffer: after the MLP only")
    bottleneck: int = Field(64, gt=0, description="hidden size of the bottleneck")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="σ between W_d and W_u")
    train_norms: bool = Field(False, description="also train the layer norms (as in Houlsby et al.)")


class Bottleneck(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[activation]
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)  # identity at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _after(module, args, output):
    return output if bypassed(module) else module.adapter(output)


def _sublayer(name: str, family: Family) -> str | None:
    """"attention" or "mlp" when `name` is the module ending that sublayer (before the residual add), else
    None. The longer pattern wins: BERT's attention ends in `attention.output.dense`, its MLP in `output.dense`."""
    hits = [(len(p), kind) for kind, p in (("attention", family.attention_out), ("mlp", family.mlp_out))
            if p and matches(name, [p])]
    return max(hits)[1] if hits else None


class Adapter(TuningMethod):
    name = "adapter"
    description = "bottleneck adapters h + W_u σ(W_d h) (Houlsby: after attention and MLP; Pfeiffer: after MLP)"
    Options = AdapterOptions
    mergeable = False  # a non-linear bottleneck cannot fold into a weight matrix

    @property
    def steps_aside(self) -> bool:  # trained layer norms are the base's own weights
        return not self.options.train_norms

    def apply(self, model: nn.Module, task: str) -> None:
        o = self.options
        family = family_of(model)
        if not (family.attention_out and family.mlp_out):
            raise UserError(f"methods (adapter): no adapter placement known for model type {family.model_type!r}; "
                            "add it to dstune/families.py")
        places = ["mlp"] if o.style == "pfeiffer" else ["attention", "mlp"]
        dim = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        self.count = 0
        for name, module in list(model.named_modules()):
            if _sublayer(name, family) in places:
                module.adapter = Bottleneck(dim, o.bottleneck, o.activation)
                module.register_forward_hook(_after)
                self.count += 1
        if o.train_norms:
            for name, p in model.named_parameters():
                if "norm" in name.lower():
                    p.requires_grad_(True)
        train_task_head(model, task)
