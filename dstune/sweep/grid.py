"""`--grid KEY=V1,V2 ...` → one adapter per combination of values over the recipe's own settings."""
from __future__ import annotations

import itertools
import re
from typing import Any

from dstune.config import (PER_ADAPTER_TRAINING, DataConfig, EvaluationConfig, RunConfig, TrainingConfig,
                           config_from_dict, read_value)
from dstune.errors import UserError, did_you_mean

METHOD_KEY = re.compile(r"^methods\[(\d+)\]\.(\w+)$")


def parse_grid(items: list[str]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """`key=v1,v2` items → [(key, [(text, value)])], values read as YAML scalars (1e-4 is a number)."""
    grid = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise UserError(f"--grid {item!r}: expected key=value,value (e.g. training.lr=1e-4,3e-4)")
        values = [(v.strip(), read_value(v.strip())) for v in raw.split(",")]
        if len({repr(v) for _, v in values}) != len(values):
            raise UserError(f"--grid {item!r}: a value is listed twice")
        if key in (k for k, _ in grid):
            raise UserError(f"--grid: {key} is given twice")
        grid.append((key, values))
    return grid


def check_key(cfg: RunConfig, key: str) -> None:
    """What an adapter may vary: training.{lr, ...}, evaluation.*, data.*, methods[i].OPTION; else one line,
    with the nearest key."""
    from dstune.methods import available

    section, _, leaf = key.partition(".")
    if m := METHOD_KEY.match(key):
        index, option = int(m.group(1)), m.group(2)
        if index >= len(cfg.methods):
            raise UserError(f"--grid {key}: the recipe lists {len(cfg.methods)} method(s) (methods[0]"
                            f"{f'..methods[{len(cfg.methods) - 1}]' if len(cfg.methods) > 1 else ''})")
        name = cfg.methods[index]["name"]
        options = available()[name].Options.model_fields
        if option not in options:
            raise UserError(f"--grid {key}: {name} has no option {option!r}{did_you_mean(option, options)}")
        return
    fields = {"training": PER_ADAPTER_TRAINING, "evaluation": EvaluationConfig.model_fields,
              "data": DataConfig.model_fields}
    if section not in fields or not leaf:
        raise UserError(f"--grid {key}: a sweep varies training.{{{','.join(PER_ADAPTER_TRAINING)}}}, evaluation.*, "
                        f"data.* or methods[i].OPTION" + did_you_mean(key, [f"training.{k}" for k in
                                                                         PER_ADAPTER_TRAINING]))
    if section == "training" and leaf in TrainingConfig.model_fields and leaf not in PER_ADAPTER_TRAINING:
        raise UserError(f"--grid {key}: shared by every adapter of the job (one base, one engine); a sweep varies "
                        f"training.{{{','.join(PER_ADAPTER_TRAINING)}}}")
    if leaf.split(".")[0] not in fields[section]:
        raise UserError(f"--grid {key}: unknown key{did_you_mean(leaf, fields[section])}")


def adapter_name(combination: list[tuple[str, str]]) -> str:
    """e.g. lr1e-4_r8: each key's last part and the value as given (a dot written p: 0p001)."""
    parts = []
    for key, text in combination:
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{SHORT.get(leaf, leaf)}{text}")
    return re.sub(r"[^A-Za-z0-9_-]", "-", "_".join(parts).replace(".", "p"))


SHORT = {"micro_batch_size": "mb", "max_steps": "steps", "weight_decay": "wd", "warmup_steps": "warmup"}


def sweep_recipe(cfg: RunConfig, items: list[str]) -> RunConfig:
    """The recipe with one adapter per combination of the grid's values (every other setting the recipe's)."""
    if cfg.adapters:
        raise UserError("adapters: the recipe lists adapters already; a sweep makes them from --grid")
    if cfg.data.eval is None and not cfg.data.eval_fraction:
        raise UserError("data.eval: a sweep ranks its settings on held-out rows; set data.eval or data.eval_fraction")
    grid = parse_grid(items)
    if not grid:
        raise UserError("--grid: give at least one key=value,value")
    for key, _ in grid:
        check_key(cfg, key)
    adapters = []
    for values in itertools.product(*(v for _, v in grid)):
        combination = list(zip((k for k, _ in grid), values))
        adapter: dict[str, Any] = {"name": adapter_name([(k, text) for k, (text, _) in combination])}
        for key, (_, value) in combination:
            if m := METHOD_KEY.match(key):
                methods = adapter.setdefault("methods", [dict(x) for x in cfg.methods])
                methods[int(m.group(1))][m.group(2)] = value
            else:
                section, leaf = key.split(".", 1)
                node = adapter.setdefault(section, {})
                *parents, last = leaf.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[last] = value
        adapters.append(adapter)
    return config_from_dict({**cfg.model_dump(mode="json"), "adapters": adapters}, "--grid")
