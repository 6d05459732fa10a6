"""BitFit: only the bias terms (and a new task head) train."""
import torch

from dstune.methods.base import TuningMethod
from dstune.methods.targets import train_task_head


class BitFit(TuningMethod):
    name = "bitfit"
    description = "BitFit: train only bias terms (plus the classification head)"
    trains_base_weights = True

    def apply(self, model: torch.nn.Module, task: str) -> None:
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
        train_task_head(model, task)
