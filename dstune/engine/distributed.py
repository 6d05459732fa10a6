"""Process-group setup: the same code path for 1 CPU process, N GPUs, or many nodes.

Launchers (`deepspeed`, `torchrun`, Slurm wrappers) set RANK/WORLD_SIZE/MASTER_*; a bare
`dstune train` gets single-process defaults, because DeepSpeed otherwise asks for mpi4py.
"""
from __future__ import annotations

import os
import re
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> None:
    """Defaults for a run without a launcher; CPU DeepSpeed accelerator when there is no GPU."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    # DeepSpeed calls collectives that torch has renamed; the warning repeats every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)


def deepspeed_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST in a form DeepSpeed's op builder can read. It parses each entry as numbers, so
    an arch-specific entry such as "9.0a" (set by some CUDA images) crashes its JIT builds (FusedAdam) with
    "invalid literal for int()"; "9.0" builds the same kernels for the optimizer."""
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int) -> Dist:
    """Join (or create) the process group with a timeout, so a dead peer fails the job instead of hanging it."""
    prepare_env()
    import deepspeed
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def shutdown(engine=None) -> None:
    """Release the engine and the process group (ZeRO-3 runs can abort at exit without this)."""
    import torch.distributed as dist
    if engine is not None:
        engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
