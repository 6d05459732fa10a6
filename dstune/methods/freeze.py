"""Partial fine-tuning: everything trains except the bottom layers and/or parameters matching regexes."""
from __future__ import annotations

import re

import torch
from pydantic import BaseModel, ConfigDict, Field

from dstune.methods.base import TuningMethod
from dstune.methods.targets import layer_index


class FreezeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: int = Field(0, ge=0, description="freeze the bottom N transformer blocks")
    patterns: list[str] = Field(default_factory=list, description="also freeze parameters whose name matches a regex")
    embeddings: bool = Field(True, description="freeze the input embeddings (and position embeddings)")


class Freeze(TuningMethod):
    name = "freeze"
    description = "partial fine-tuning: train all but the bottom N layers / regex-matched parameters"
    Options = FreezeOptions
    order = 0
    trains_base_weights = True

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        return {"freeze": [{"name": "freeze", "layers": 1}]}

    def apply(self, model: torch.nn.Module, task: str) -> None:
        o = self.options
        regexes = [re.compile(p) for p in o.patterns]
        embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                            for p in m.parameters()}
        for name, p in model.named_parameters():
            layer = layer_index(name)
            frozen = ((layer is not None and layer < o.layers) or any(r.search(name) for r in regexes)
                      or (o.embeddings and id(p) in embedding_params))
            p.requires_grad_(not frozen)
