"""Full (task) fine-tuning: every parameter trains."""
import torch

from dstune.methods.base import TuningMethod


class Full(TuningMethod):
    name = "full"
    description = "full fine-tuning: every parameter of the model trains"
    order = 0
    trains_base_weights = True
    conflicts = {"freeze": "freeze already trains everything it does not freeze"}

    def apply(self, model: torch.nn.Module, task: str) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
