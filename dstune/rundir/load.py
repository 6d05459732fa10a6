"""Load a finished run directory back: config, tokenizer, and the model with what trained."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from dstune.config import RunConfig, config_from_dict, merge, parse_overrides
from dstune.rundir.trainable import BEST, load_trainable, trainable_file
from dstune.errors import UserError
from dstune.methods import apply_methods, build_methods
from dstune.models.loading import cast_as_deepspeed, load_model
from dstune.models.tokenizers import load_tokenizer


def is_run_dir(path: Path) -> bool:
    """Whether `path` looks like a folder `dstune train` wrote (it may not have finished)."""
    return (path / "config.yaml").is_file() and (path / "run.json").is_file()


@dataclass
class Run:
    """A finished run loaded back: its recipe, tokenizer, the model with what trained (in eval mode), the
    classification labels (None for other tasks), the tuning methods applied, and the trainable state
    loaded (trainable.safetensors: the last step's; best.safetensors: the best-scoring one's)."""
    cfg: RunConfig
    tokenizer: Any
    model: torch.nn.Module
    labels: list | None
    methods: list
    state: Path

    def best_step(self) -> int | None:
        """The step whose state was loaded when it is the best-scoring one (results.json), else None."""
        if self.state.name != BEST:
            return None
        return (json.loads((self.state.parent / "results.json").read_text()).get("best") or {}).get("step")


def job_of_adapters(d: Path) -> None:
    """A job of several adapters is no run of one: name its adapters' run dirs instead."""
    try:
        adapters = json.loads((d / "run.json").read_text()).get("adapters")
    except (OSError, ValueError):
        return
    if adapters:
        raise UserError(f"{d}: a job of {len(adapters)} adapters; each is a run dir of its own: "
                        + ", ".join(str(d / "adapters" / a) for a in adapters[:4]) + (", ..." if len(adapters) > 4
                                                                                       else ""))


def finished_recipe(run_dir: str, overrides: list[str] | None = None) -> RunConfig:
    """The recipe a finished run trained with, `overrides` (key=value) applied; read before any weights: a
    one-line error when `run_dir` is not a finished run, or holds no tokenizer."""
    d = Path(run_dir)
    job_of_adapters(d)
    for name in ("config.yaml", "run.json", "trainable.safetensors"):
        if not (d / name).is_file():
            raise UserError(f"{d}: not a finished dstune run (missing {name})")
    if not (d / "tokenizer").is_dir():
        raise UserError(f"{d}: trained on random token ids, it has no tokenizer to read or write text with")
    saved = yaml.safe_load((d / "config.yaml").read_text())
    if overrides:
        return config_from_dict(merge(saved, parse_overrides(overrides)), "override")
    return config_from_dict(saved, str(d / "config.yaml"))


def load_run(run_dir: str, device: torch.device | None = None, overrides: list[str] | None = None,
             check: Callable[[RunConfig, Any], None] | None = None, checkpoint: str | None = None) -> Run:
    """Load a run dir written by `dstune train` (a one-line error when it is not a finished run), its weights
    in the dtype training held them in (training.precision, which `overrides` may change), so that its
    evaluation scores what training's did. `check(cfg, tokenizer)` may refuse the run (raise UserError)
    before any weights load. `checkpoint`: which trainable state (rundir/trainable.py `trainable_file`)."""
    d = Path(run_dir)
    cfg = finished_recipe(run_dir, overrides)
    info = json.loads((d / "run.json").read_text())
    state = trainable_file(d, checkpoint)
    tokenizer = load_tokenizer(str(d / "tokenizer"))
    if check is not None:
        check(cfg, tokenizer)
    model = load_model(cfg, tokenizer, info.get("labels"))
    methods = build_methods(cfg.methods)
    apply_methods(model, methods, cfg.task, tokenizer)
    load_trainable(model, state)
    cast_as_deepspeed(model.to(device or torch.device("cpu")), cfg.training.precision).eval()
    return Run(cfg, tokenizer, model, info.get("labels"), methods, state)
