"""Adaptive fine-tuning: layer-wise learning-rate decay (lower layers learn more slowly)."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dstune.families import depth
from dstune.methods.base import TuningMethod
from dstune.methods.targets import layer_index


class LayerwiseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decay: float = Field(0.8, gt=0, le=1, description="LR factor per layer going down from the top block")


class LayerwiseLR(TuningMethod):
    """Block i of L gets lr × decay^(L-1-i); embeddings get decay^L; heads and final norms the full lr."""

    name = "layerwise_lr"
    description = "adaptive fine-tuning: LR decays by a factor per layer from the top (use with full or freeze)"
    Options = LayerwiseOptions
    needs_one_of = ("full", "freeze")
    order = 2

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        return {"layerwise_lr": [{"name": "full"}, {"name": "layerwise_lr"}]}

    def apply(self, model: torch.nn.Module, task: str) -> None:
        self.n_layers = depth(model.config)  # sets no requires_grad: it only shapes the optimizer groups
        self.embedding_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}

    def lr_scale(self, param_name: str) -> float:
        layer = layer_index(param_name)
        if layer is not None:
            return self.options.decay ** (self.n_layers - 1 - layer)
        if param_name.rsplit(".", 1)[0] in self.embedding_names:
            return self.options.decay ** self.n_layers
        return 1.0
