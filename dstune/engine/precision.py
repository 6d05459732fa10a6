"""training.precision: auto picks what this machine runs fast; an explicit choice that will be slow here
is warned about once.

On CUDA, auto is bf16 where the device supports it, else fp16. On a CPU without AVX512-BF16 or AMX it is
fp32 (bf16 is emulated there: a bf16 LoRA step of SmolLM2 took 53 s against 3 s in fp32). On a CPU with
them it is measured once per machine (engine/cpu_probe.py): such a CPU runs a bf16 matmul several times
faster than fp32, but not every bf16 training step.
"""
from __future__ import annotations

import functools
import os

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> str | None:
    """The CPU feature that runs bf16 natively (avx512_bf16, amx_bf16), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    return found[-1] if found else None


def on_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def resolve(precision: str, cuda: bool | None = None) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why): `auto` made concrete for this machine (or for a CUDA device, `cuda`)."""
    cuda = on_cuda() if cuda is None else cuda
    if precision != "auto":
        return precision, "set in the recipe"
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU runs bf16"
        return "fp16", "auto: the GPU has no bf16"
    feature = cpu_bf16()
    if not feature:
        return "fp32", "auto: the CPU has no native bf16"
    from dstune.engine.cpu_probe import cpu_precision
    return cpu_precision(feature)


def cpu_fp16() -> bool:
    """Whether DeepSpeed's CPU accelerator runs fp16 here: it asks oneDNN, which needs AVX512-FP16 or AMX-FP16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def unsupported(precision: str, cuda: bool | None = None) -> str | None:
    """One line when DeepSpeed cannot train in `precision` on this machine at all, else None."""
    cuda = on_cuda() if cuda is None else cuda
    if not cuda and precision == "fp16" and not cpu_fp16():
        return ("training.precision: fp16 does not run on this CPU (DeepSpeed's CPU accelerator needs oneDNN fp16: "
                "AVX512-FP16 or AMX-FP16); set fp32, bf16 or auto")
    return None


def slow_warning(precision: str, cuda: bool | None = None) -> str | None:
    """One line when an explicit precision will be slow on this machine, else None."""
    cuda = on_cuda() if cuda is None else cuda
    if cuda:
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "training.precision: bf16 on a GPU without bf16 support; set fp16 or auto"
        return None
    if precision == "bf16" and not cpu_bf16():
        return ("training.precision: bf16 on a CPU without AVX512-BF16 or AMX runs many times slower than fp32 "
                "here (a SmolLM2 LoRA step: 53 s against 3 s); set fp32 or auto")
    if precision == "fp16":
        return "training.precision: fp16 on a CPU is emulated and slow; set fp32 or auto"
    return None

