"""training.precision: auto on a CPU that runs bf16 natively (AVX512-BF16, AMX) is decided by measurement: a
native bf16 instruction set does not make a bf16 training step faster on every such CPU (nor at every
thread count), so a short probe times one forward and backward pass of a small transformer block in fp32
and in bf16 as the trainer runs them (DeepSpeed's bf16 mode holds bf16 weights, no autocast), and bf16 is
taken only where it is clearly faster.

The probe is a one-layer Llama of SmolLM2-135M's width (hidden 576, 9 heads, 3 KV heads, MLP 1536) with
dstune's lean activations, on a batch of 2 × 256 tokens; every parameter trains. Its timings are the best of
3 after a warm-up, the two precisions interleaved (well under 2 s on 2 cores). The answer is kept per
machine in ~/.cache/dstune/cpu-precision.json, keyed by the CPU's model name, the instruction sets that
matter, the torch version and the thread count; processes on one machine take a file lock, so one measures
and the others read its answer. $DSTUNE_CPU_PRECISION=probe measures again (and keeps the new answer), and
fp32 or bf16 takes that answer without measuring (what the test suite does); deleting the file measures
again too.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from dstune.digests import read_memo, write_atomic
from dstune.errors import UserError

PIN = "DSTUNE_CPU_PRECISION"
MIN_SPEEDUP = 1.1  # bf16 must be this much faster than fp32 to be taken: fp32 is the safer choice
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
SHAPE = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
TOKENS = (2, 256)  # batch, sequence
REPEATS = 3
BUDGET_S = 2.0  # a timed round after the first starts only this many seconds into the probe (a busy machine)
_measured_here: set[str] = set()  # keys this process measured (`probe` measures once per process)


def cache_file() -> Path:
    return Path.home() / ".cache" / "dstune" / "cpu-precision.json"


def cpu_info() -> tuple[str, list[str]]:
    """(the CPU's model name, the instruction sets of FLAGS it has)."""
    name, flags = "unknown CPU", []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    return name, [f for f in FLAGS if f in flags]


def machine_key() -> str:
    name, flags = cpu_info()
    return f"{name} | {' '.join(flags)} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def measure(shape: dict = SHAPE, tokens: tuple[int, int] = TOKENS, repeats: int = REPEATS) -> dict[str, float]:
    """Seconds of one forward and backward pass of the probe block, in fp32 and in bf16 (best of `repeats`)."""
    import transformers

    from dstune.families import tiny_config
    from dstune.models.lean_activations import use_lean_activations

    config = tiny_config("llama", 256, {}, {**shape, "num_hidden_layers": 1, "max_position_embeddings": tokens[1]})
    with torch.random.fork_rng():  # the run's own random state is left as it was
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    use_lean_activations(model)
    models = {"fp32": model.train(), "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    ids = torch.randint(0, 256, tokens, generator=torch.Generator().manual_seed(0))
    best, began = {name: float("inf") for name in models}, time.perf_counter()
    for i in range(repeats + 1):  # the first round warms up
        if i > 1 and time.perf_counter() - began > BUDGET_S:
            break
        for name, m in models.items():
            start = time.perf_counter()
            m(input_ids=ids).logits.float().square().mean().backward()
            if i:
                best[name] = min(best[name], time.perf_counter() - start)
    return {"fp32_s": best["fp32"], "bf16_s": best["bf16"]}


def decide(timings: dict) -> tuple[str, float]:
    """(fp32 | bf16, bf16's speed as a multiple of fp32's) from the probe's timings."""
    speed = timings["fp32_s"] / timings["bf16_s"]
    return ("bf16" if speed >= MIN_SPEEDUP else "fp32"), speed


def _sound(entry) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                                           for k in ("fp32_s", "bf16_s"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An OS lock beside `path` (released by the kernel however its holder ends); nothing where none can be
    made (a read-only home)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cpu_precision(feature: str) -> tuple[str, str]:
    """(fp32 | bf16, why) for `auto` on this CPU, which runs bf16 natively through `feature`: the probe's
    answer, measured now or kept from before."""
    pin = os.environ.get(PIN, "").strip().lower()
    if pin in ("fp32", "bf16"):
        return pin, f"auto: {PIN}={pin}"
    if pin not in ("", "probe"):
        raise UserError(f"{PIN}: {pin!r} is none of fp32, bf16, probe (or unset: measure once per machine)")
    key, path = machine_key(), cache_file()
    with _locked(path):  # the ranks of one machine: one measures, the others wait and read its answer
        entry = read_memo(path).get(key)
        fresh = not _sound(entry) or (pin == "probe" and key not in _measured_here)
        if fresh:
            entry = {**measure(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
            _measured_here.add(key)
            with contextlib.suppress(OSError):  # an unwritable home: measured again next time
                write_atomic(path, json.dumps({**read_memo(path), key: entry}, indent=1))
    precision, speed = decide(entry)
    return precision, (f"auto: measured bf16 at {speed:.2f}x the speed of fp32 on this {feature} CPU; "
                       f"{'measured now, kept' if fresh else 'kept'} in {path}")
