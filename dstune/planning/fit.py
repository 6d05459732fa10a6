"""training.activation_checkpointing: auto — on only where the run would not fit without it.

Recomputing activations costs time (1.6x per step for SmolLM2 LoRA on a CPU with memory to spare), so it
is worth it only where memory is short: the memory estimate (`dstune estimate`, without checkpointing)
is compared with what one rank has, a GPU's memory or the node's RAM shared by its ranks, less a margin
for what the estimate leaves out.
"""
from __future__ import annotations

import os

import torch

from dstune.config import RunConfig

MARGIN = 0.9  # of the device's memory the estimate may fill


def rank_memory(device: torch.device) -> int:
    """Bytes one rank can use: its GPU's total memory, or the node's RAM over the ranks on the node."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    import psutil
    return psutil.virtual_memory().total // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def resolve_checkpointing(cfg: RunConfig, world: int, device: torch.device, tokenizer=None,
                          labels: list | None = None) -> tuple[bool, str]:
    """(on, why) for activation_checkpointing: auto; the recipe's own choice otherwise."""
    setting = cfg.training.activation_checkpointing
    if setting != "auto":
        return bool(setting), ""
    from dstune.planning.estimate import estimate
    from dstune.planning.report import human_bytes

    per_rank, _, _ = estimate(cfg.with_training(activation_checkpointing=False), world, cuda=device.type == "cuda",
                              tokenizer=tokenizer, labels=labels)
    need, have = per_rank[0].total, int(MARGIN * rank_memory(device))
    on = need > have
    return on, (f"auto: without it the estimate is {human_bytes(need)} per rank, "
                f"{'more' if on else 'less'} than {human_bytes(have)} ({MARGIN:.0%} of this rank's memory)")

