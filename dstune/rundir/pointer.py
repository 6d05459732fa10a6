"""RUN_DIR/checkpoints/last_complete: the pointer to the checkpoints every rank finished writing.

A checkpoint counts as complete only once every rank has written it: the engine calls `commit` after a
barrier, which replaces the pointer atomically (so a save cut off half-way is never loaded) and removes the
checkpoints no longer kept. The pointer names plain folders of this run only: a path elsewhere is refused,
because loading a checkpoint unpickles it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from dstune.errors import UserError

POINTER = "last_complete"
TAG = re.compile(r"^step_\d{8}$")  # what tag_of writes: a plain folder name, never a path


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The optimizer step a checkpoint's tag names (`step_00000012` → 12)."""
    return int(tag.rsplit("_", 1)[1])


def commit(run_dir: str | os.PathLike, tag: str, step: int, keep: int) -> None:
    """Point at `tag` (written by every rank), keeping the `keep` newest complete checkpoints: a damaged
    newest one falls back to the next. The older ones up to `tag` are removed."""
    ckpt = checkpoint_dir(run_dir)
    kept = [tag] + [old for old in _pointed(ckpt) if old < tag][:keep - 1]
    tmp = ckpt / f".{POINTER}.tmp"
    tmp.write_text(json.dumps({"tag": tag, "global_step": step, "kept": kept}))
    _fsync(tmp)
    os.replace(tmp, ckpt / POINTER)
    _fsync(ckpt)  # the rename itself reaches the disk
    _prune(ckpt, tag, kept)


def complete_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Tags of the kept checkpoints every rank finished writing, newest first."""
    ckpt = checkpoint_dir(run_dir)
    return [tag for tag in _pointed(ckpt) if (ckpt / tag).is_dir()]


def last_complete(run_dir: str | os.PathLike) -> str | None:
    """Tag of the newest checkpoint every rank finished writing, or None."""
    return next(iter(complete_checkpoints(run_dir)), None)


def _pointed(ckpt: Path) -> list[str]:
    """The checkpoints the pointer lists as complete, newest first (a pointer from before the list: its tag).
    A pointer that names anything but a checkpoint folder of this run (a path such as ../../elsewhere) is
    refused: the load would unpickle it."""
    pointer = ckpt / POINTER
    if not pointer.is_file():
        return []
    try:
        saved = json.loads(pointer.read_text())
        tags = saved.get("kept", [saved["tag"]])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{pointer}: not a checkpoint pointer dstune wrote; remove it, or the run dir") from None
    for tag in tags if isinstance(tags, list) else [tags]:
        if not isinstance(tag, str) or not TAG.match(tag):
            raise UserError(f"{pointer}: tag {tag!r} is not a checkpoint of this run (step_NNNNNNNN); "
                            "remove the pointer, or the run dir") from None
    return tags


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(ckpt: Path, newest: str, kept: list[str]) -> None:
    """Remove the checkpoints up to `newest` (the one the pointer names) that are not kept; folders of later
    steps (a run that went further before a rerun from an earlier checkpoint) are left alone."""
    for p in ckpt.iterdir():
        if p.is_dir() and TAG.match(p.name) and p.name <= newest and p.name not in kept:
            shutil.rmtree(p, ignore_errors=True)
