"""Process-group setup: the same code path for 1 CPU process, N GPUs, or many nodes.

Launchers (`deepspeed`, `torchrun`, Slurm wrappers) set RANK/WORLD_SIZE/MASTER_*; a bare
`dstune train` gets single-process values for the job's lifetime (`launcher_env`), because DeepSpeed
otherwise asks for mpi4py.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import signal
import socket
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch

from dstune.errors import StopSignal
from dstune.kernels.build import BUILD_TIMEOUT_S, guard_jit_builds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launcher_env() -> Iterator[None]:
    """For a job's lifetime: the launcher's RANK/WORLD_SIZE/MASTER_* (a rank a launcher started ends with it),
    or, without a launcher, single-process values, removed again afterwards so that a job run inside another
    program leaves its environment as it found it."""
    if "RANK" in os.environ:
        end_with_parent()
        yield
        return
    single = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    added = {name: value for name, value in single.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """For a job's lifetime: SIGTERM (what torchrun, DeepSpeed's launcher and Slurm send to stop a rank) raises
    StopSignal in the main thread, as Ctrl-C raises KeyboardInterrupt, so the job ends through the same
    path: its run dir released, one line said. Ctrl-C does so even in a process that inherited SIGINT
    ignored (a background job of a non-interactive shell, some cluster wrappers). The previous handlers are
    put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise StopSignal(signum)
    before = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def prepare_env() -> None:
    """The CPU DeepSpeed accelerator when there is no GPU, an op-build arch list DeepSpeed can read, and no
    repeated deprecation warnings."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    # DeepSpeed calls collectives that torch has renamed; the warning repeats every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)


def end_with_parent() -> None:
    """SIGTERM this process when the process that started it dies (Linux), so ranks whose launcher was
    killed (kill -9 of torchrun) stop instead of training on and writing the run dir unwatched."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


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


def init_distributed(timeout_s: int, build_timeout_s: float = BUILD_TIMEOUT_S) -> Dist:
    """Join (or create) the process group with a timeout, so a dead or hung peer fails the job instead of
    hanging it; JIT builds of ops (DeepSpeed builds its CPU comm op here) survive killed builders."""
    prepare_env()
    import deepspeed
    import torch.distributed as dist

    guard_jit_builds(build_timeout_s)
    cuda = torch.cuda.is_available()
    bound_new_groups(timedelta(seconds=timeout_s))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def bound_new_groups(timeout: timedelta) -> None:
    """Give every process group made from here on `timeout` unless its maker chose one. DeepSpeed makes its
    data-parallel and ZeRO groups with new_group(ranks) and no timeout, which torch sets to 30 minutes
    whatever the world group has: a hung peer (stopped, on a stuck node) would hold the job that long."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    original = getattr(c10d.new_group, "__wrapped__", c10d.new_group)

    @functools.wraps(original)
    def new_group(*args, **kwargs):
        if len(args) < 2 and kwargs.get("timeout") is None:  # timeout is new_group's second parameter
            kwargs["timeout"] = timeout
        return original(*args, **kwargs)

    dist.new_group = c10d.new_group = new_group


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (a collective; [obj] without a process group)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_batches(n: int, rank: int, world: int, batch_size: int) -> list[list[tuple[int, bool]]]:
    """This rank's batches of (index, counts) pairs, padded so every rank has the same number of batches."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    n_batches = math.ceil(per_rank / batch_size)
    padded = [(i, True) for i in mine] + [(0, False)] * (n_batches * batch_size - len(mine))
    return [padded[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


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
    """Release the engine and the process group (ZeRO-3 runs can abort at exit without this), and forget the
    groups DeepSpeed made from it, so that a later job in the same process makes its own."""
    import importlib

    import deepspeed.utils.groups
    import torch.distributed as dist

    if engine is not None:
        engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
        # its module globals hold the old world group's clone and the data-parallel groups: reloading the module
        # resets them in place (modules that imported it keep the same module object)
        importlib.reload(deepspeed.utils.groups)
