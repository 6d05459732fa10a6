"""Where methods attach: layer indices, linear layers, task heads, and a method's default targets per family."""
from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from dstune.errors import UserError

_LAYER = re.compile(r"\.(?:layers|layer|h|block)\.(\d+)\.")

from dstune.families import TASK_HEADS  # noqa: F401 (methods and exports find the heads here)


def layer_index(param_name: str) -> int | None:
    """Transformer block index in a parameter/module name (`model.layers.3.mlp...` → 3), else None."""
    m = _LAYER.search(f".{param_name}.")
    return int(m.group(1)) if m else None


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear (quantized too) or GPT-2's transposed Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    shape = getattr(w, "ds_shape", w.shape)  # ZeRO-3 partitioned weights keep their real shape here
    return (shape[1], shape[0]) if isinstance(module, nn.Linear) else (shape[0], shape[1])


def _is_output_head(model: nn.Module, name: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n for n, m in model.named_modules() if out is not None and m is out}
    return name in head_names or name.split(".")[0] in TASK_HEADS


def matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule: a target matches a module whose name equals it or ends with `.target`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_linears(model: nn.Module, targets: list[str] | str) -> Iterator[tuple[str, nn.Module]]:
    """Linear layers named by `targets` ("all-linear": every linear except output and task heads)."""
    from dstune.methods.routing import SLOTS

    found = False
    for name, module in model.named_modules():
        if not is_linear(module) or SLOTS in name.split("."):  # another adapter's modules are no target
            continue
        hit = not _is_output_head(model, name) if targets == "all-linear" else matches(name, list(targets))
        if hit:
            found = True
            yield name, module
    if not found:
        raise UserError(f"target_modules: {targets!r} matches no linear layer of this {model.config.model_type} model")


def train_task_head(model: nn.Module, task: str) -> None:
    if task == "classification":
        for name, p in model.named_parameters():
            if name.split(".")[0] in TASK_HEADS:
                p.requires_grad_(True)


def default_targets(model: nn.Module, method: str, defaults: dict[str, tuple]) -> tuple:
    """`defaults[model type]` (a method's table of default targets per family), or a one-line error naming
    what the recipe can set (for a discovered family, with the linear layers its blocks have)."""
    from dstune.families import family_of

    family = family_of(model)
    if family.model_type not in defaults:
        found = f" ({family.notes[0]})" if family.notes and family.notes[0].startswith("discovered") else ""
        raise UserError(f"methods ({method}).target_modules: no default for model type {family.model_type!r}"
                        f"{found}; set target_modules")
    return defaults[family.model_type]
