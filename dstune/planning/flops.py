"""Model FLOPs and MFU: the formula is written where the number is computed."""
from __future__ import annotations

import torch

# dense bf16/fp16 tensor-core peak per device (vendor spec sheets), FLOP/s
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(body_params: int, trainable_params: int, full: bool, layers: int, hidden: int,
                    seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as in the peer baseline:

    full fine-tuning: 6·N (2N forward, 2N input gradients, 2N weight gradients);
    parameter-efficient: 4·N + 2·N_trainable (no weight gradients for frozen weights);
    plus causal attention 12·L·h·S/2 (scores and values, forward and backward, half the keys on average).
    N excludes the embedding table (a lookup, not a matmul).
    """
    weights = 6 * body_params if full else 4 * body_params + 2 * trainable_params
    return weights + 12 * layers * hidden * seq_len / 2


def device_peak_flops() -> float | None:
    """Peak FLOP/s of the local accelerator, or None where unknown (CPU, unlisted GPUs)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float, per_token: float, world: int = 1) -> float | None:
    """Model FLOPs utilisation = tokens/s · FLOPs per token / (peak FLOP/s · ranks)."""
    peak = device_peak_flops()
    return None if peak is None else tokens_per_s * per_token / (peak * world)
