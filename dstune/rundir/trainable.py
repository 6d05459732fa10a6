"""RUN_DIR/trainable.safetensors: only what trained, written whole or not at all, and loaded back into a
model built the same way."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dstune.errors import UserError

TRAINABLE = "trainable.safetensors"
BEST = "best.safetensors"  # the best-scoring trainable state (evaluation.keep_best)
CHECKPOINTS = ("best", "last")


def trainable_file(run_dir: str | os.PathLike, checkpoint: str | None = None) -> Path:
    """The trainable state of a finished run to load: `last` (trainable.safetensors), `best` (best.safetensors,
    kept with evaluation.keep_best), or None: the best where the run kept one, else the last."""
    d = Path(run_dir)
    if checkpoint == "best" and not (d / BEST).is_file():
        raise UserError(f"--checkpoint: {d} kept no best state (train with evaluation.keep_best or "
                        "evaluation.early_stopping); use --checkpoint last")
    if checkpoint == "best" or (checkpoint is None and (d / BEST).is_file()):
        return d / BEST
    return d / TRAINABLE


def file_mode() -> int:
    """The mode a new file gets here (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, written whole (a temporary file renamed into place) and readable as any file
    the process writes (save_file itself leaves mode 0600, whatever the umask)."""
    from safetensors.torch import save_file

    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def load_trainable(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load trainable.safetensors into a model built the same way; every key must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); the run did not finish writing it, "
                        "or it was damaged") from None
    missing_here = [k for k in state if k not in dict(model.named_parameters())]
    if missing_here:
        raise ValueError(f"{path}: {len(missing_here)} tensors have no parameter in the model, e.g. {missing_here[0]}")
    model.load_state_dict(state, strict=False)
