"""DeepSpeed config: a file from ds_configs/, the user's JSON, or inline, completed from the recipe.

The recipe is the single source of training hyper-parameters: batch sizes, clipping, precision and
the optimizer's lr/betas/eps/weight decay are written into the DeepSpeed config from it; ZeRO,
offload and communication settings come from the DeepSpeed config.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import torch

from dstune.config import RunConfig
from dstune.engine.precision import resolve
from dstune.errors import UserError, did_you_mean

# package data; the top-level ds_configs/ is a link to it for people and their own `deepspeed` scripts
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def named_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: deepspeed: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: deepspeed: a DeepSpeed config is a JSON object")
    return data


def base_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"deepspeed: file not found: {path}")
        return _read_json(path)
    path = DS_CONFIG_DIR / f"{spec}.json"
    if not path.is_file():
        raise UserError(f"deepspeed: unknown config {spec!r}; known: {', '.join(named_configs())} or a .json path")
    return _read_json(path)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


@functools.lru_cache(maxsize=1)
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys DeepSpeed reads: those its config parser looks up (recorded while it parses a
    minimal config) and the section names its constants modules define for the parts that read their own
    (optimizer, activation checkpointing, flops profiler, aio, autotuning)."""
    import importlib

    from deepspeed.runtime.config import DeepSpeedConfig

    class Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

    seen: set[str] = set()
    DeepSpeedConfig(Recording(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    for name in ("deepspeed.runtime.constants", "deepspeed.runtime.activation_checkpointing.config",
                 "deepspeed.profiling.constants", "deepspeed.runtime.swap_tensor.constants",
                 "deepspeed.autotuning.constants"):
        seen |= {v for k, v in vars(importlib.import_module(name)).items()
                 if k.isupper() and isinstance(v, str) and v.isidentifier() and v.islower()}
    return frozenset(seen)


def check_sections(ds: dict[str, Any]) -> None:
    """What DeepSpeed would ignore silently (an unknown top-level key: a typo such as zero_optimisation) or
    reject only inside deepspeed.initialize, with a traceback: the ZeRO section (validated by DeepSpeed's
    own schema: types, ranges, unknown keys) and the optimizer's type."""

    import pydantic
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    unknown = sorted(set(ds) - deepspeed_keys())
    if unknown:
        raise UserError(f"deepspeed: unknown key {unknown[0]!r}" + did_you_mean(unknown[0], deepspeed_keys())
                        + "; DeepSpeed would ignore it")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"deepspeed: zero_optimization must be a mapping such as {{\"stage\": 2}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed: zero_optimization.stage must be 0-3, got {stage!r}")
    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise UserError(f"deepspeed: zero_optimization.{where}: {msg}"
                        + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" else "")) from None
    name = ds.get("optimizer", {}).get("type", "AdamW")
    if not isinstance(name, str) or (name.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, name)):
        raise UserError(f"deepspeed: optimizer.type {name!r} is neither a DeepSpeed optimizer "
                        f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor one of torch.optim")


def build_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    t = cfg.training
    ds = base_config(cfg.deepspeed)
    check_sections(ds)
    ds.pop("scheduler", None)  # the schedule comes from training.lr_schedule
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        train_batch_size=t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        gradient_clipping=t.max_grad_norm,
        steps_per_print=ds.get("steps_per_print", 10**9),
    )
    precision = resolve(t.precision)[0]  # the trainer resolves `auto` before; other callers here
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt["params"] = {**opt.get("params", {}), "lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                     "weight_decay": t.weight_decay}
    if not torch.cuda.is_available():
        # the fused (CUDA) Adam would be JIT-compiled for nothing; torch's AdamW does the same maths
        opt["params"].setdefault("torch_adam", True)
    return ds
