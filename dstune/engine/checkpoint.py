"""Checkpoints: DeepSpeed checkpoints plus a pointer to the last *complete* one, and the
small `trainable.safetensors` holding only what trained.

A checkpoint counts as complete only once every rank has finished writing it: the pointer
file is replaced atomically after a barrier, so a save cut off half-way is never loaded.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from dstune.engine.distributed import barrier
from dstune.errors import UserError

POINTER = "last_complete"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(engine, run_dir: str, step: int, is_main: bool, keep: int = 2) -> str:
    """Write checkpoint `step` on every rank, then point at it; the `keep` newest complete ones stay."""
    tag = _tag(step)
    ckpt = checkpoint_dir(run_dir)
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"global_step": step}, save_latest=False)
    barrier()
    if is_main:
        tmp = ckpt / f".{POINTER}.tmp"
        tmp.write_text(json.dumps({"tag": tag, "global_step": step}))
        _fsync(tmp)
        os.replace(tmp, ckpt / POINTER)
        _fsync(ckpt)  # the rename itself reaches the disk
        _prune(ckpt, tag, keep)
    barrier()
    return tag


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(ckpt: Path, newest: str, keep: int) -> None:
    """Remove checkpoints older than the `keep` newest up to `newest` (the one the pointer names); folders
    of later steps (a run that went further before a rerun from an earlier checkpoint) are left alone."""
    import shutil

    older = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and TAG.match(p.name) and p.name <= newest)
    for name in older[:-keep]:
        shutil.rmtree(ckpt / name, ignore_errors=True)


def _tag(step: int) -> str:
    return f"step_{step:08d}"


TAG = re.compile(r"^step_\d{8}$")  # what _tag writes: a plain folder name, never a path


def last_complete(run_dir: str) -> str | None:
    """Tag of the newest checkpoint every rank finished writing, or None. A pointer that names anything but
    a checkpoint folder of this run (a path such as ../../elsewhere) is refused: the load would unpickle it."""
    pointer = checkpoint_dir(run_dir) / POINTER
    if not pointer.is_file():
        return None
    try:
        tag = json.loads(pointer.read_text())["tag"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{pointer}: not a checkpoint pointer dstune wrote; remove it, or the run dir") from None
    if not isinstance(tag, str) or not TAG.match(tag):
        raise UserError(f"{pointer}: tag {tag!r} is not a checkpoint of this run (step_NNNNNNNN); "
                        "remove the pointer, or the run dir") from None
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


def load_checkpoint(engine, run_dir: str, tag: str) -> int:
    """Restore model, optimizer and LR schedule; return the global step to continue from."""
    path, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    return int(client["global_step"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of the trainable parameters; a collective under ZeRO-3, so call it on every rank."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().to("cpu", torch.float32).clone().contiguous() for n, p in named}


def save_trainable(model: torch.nn.Module, path: str | os.PathLike, is_main: bool, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = trainable_state(model)
    if is_main:
        tmp = Path(f"{path}.tmp")
        save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    barrier()


def load_trainable(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load trainable.safetensors into a model built the same way; every key must match."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing_here = [k for k in state if k not in dict(model.named_parameters())]
    if missing_here:
        raise ValueError(f"{path}: {len(missing_here)} tensors have no parameter in the model, e.g. {missing_here[0]}")
    model.load_state_dict(state, strict=False)
