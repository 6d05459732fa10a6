"""The tuning-method contract: what trains, how it is optimised, what is saved."""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TuningMethod:
    """A plugin that decides which parameters of a loaded model train.

    Subclasses set `name`, `description` (one line, shown by `dstune methods`) and
    `Options` (a pydantic model whose field descriptions document the options).
    The model arrives fully frozen; `apply` marks or adds what trains.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel):
        self.options = options

    def apply(self, model: torch.nn.Module, task: str) -> None:
        """Set requires_grad on existing parameters and/or add trainable modules."""
        raise NotImplementedError

    def lr_scale(self, param_name: str) -> float:
        """Multiplier on the base LR for one trainable parameter (1.0 unless the method says otherwise)."""
        return 1.0
