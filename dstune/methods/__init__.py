"""Tuning-method registry: built-ins register with one line; others via the `dstune.methods` entry point."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

import torch
from pydantic import ValidationError

from dstune.errors import UserError, did_you_mean
from dstune.methods.adapter import Adapter
from dstune.methods.base import TuningMethod
from dstune.methods.bitfit import BitFit
from dstune.methods.freeze import Freeze
from dstune.methods.full import Full
from dstune.methods.ia3 import IA3
from dstune.methods.layerwise_lr import LayerwiseLR
from dstune.methods.lora import Lora
from dstune.methods.prefix import Prefix
from dstune.methods.prompt import Prompt
from dstune.models.quantize import param_count, refuse_trained_quantized

METHODS: dict[str, type[TuningMethod]] = {}


def register(cls: type[TuningMethod]) -> type[TuningMethod]:
    METHODS[cls.name] = cls
    return cls


register(Full)
register(Freeze)
register(LayerwiseLR)
register(BitFit)
register(Lora)
register(IA3)
register(Adapter)
register(Prompt)
register(Prefix)


def available() -> dict[str, type[TuningMethod]]:
    """Built-in methods plus third-party ones published under the `dstune.methods` entry-point group."""
    found = dict(METHODS)
    for ep in entry_points(group="dstune.methods"):
        found.setdefault(ep.name, ep.load())
    return found


def bench_presets() -> dict[str, list[dict]]:
    """What each name on `dstune bench --methods` trains, from every method's own presets (plugins too)."""
    return {name: spec for cls in available().values() for name, spec in cls.bench_presets().items()}


def bench_overrides() -> dict[str, list[str]]:
    """The recipe overrides each bench preset runs with (most have none)."""
    return {name: o for cls in available().values() for name, o in cls.bench_overrides().items()}


def build_methods(specs: list[dict[str, Any]]) -> list[TuningMethod]:
    """Turn the recipe's `methods:` list into method objects, validating each one's options."""
    known = available()
    if not specs:
        raise UserError("methods: list at least one tuning method (e.g. - name: full)")
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in known:
            raise UserError(f"methods[{i}].name: unknown method {name!r}{did_you_mean(str(name), known)}; known: "
                            f"{', '.join(sorted(known))}")
        cls = known[name]
        try:
            options = cls.Options.model_validate(spec)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            msg = unknown_option(key, cls) if err["type"] == "extra_forbidden" \
                else err["msg"].removeprefix("Value error, ")   # a check across options has no key of its own
            raise UserError(f"methods[{i}] ({name}){'.' + key if key else ''}: {msg}") from None
        out.append(cls(options))
    check_composition([m.name for m in out])
    return sorted(out, key=lambda m: m.order)  # base trainers first, then added modules, then LR shapers


def unknown_option(key: str, cls: type[TuningMethod]) -> str:
    """'unknown option' and the nearest option's name, or the method's options when none is near."""
    options = cls.Options.model_fields
    return "unknown option" + (did_you_mean(key, options) or f"; {cls.name}'s options: {', '.join(options)}")


def check_composition(names: list[str]) -> None:
    """Reject duplicates and contradictory pairs, naming both methods."""
    known = available()
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserError(f"methods: {name} is listed twice")
        for other in names[:i]:
            if other in known[name].conflicts or name in known[other].conflicts:
                raise UserError(f"methods: {other} and {name} cannot be combined: "
                                f"{known[name].conflicts.get(other) or known[other].conflicts.get(name)}")
        needs = known[name].needs_one_of
        if needs and not any(n in needs for n in names):
            raise UserError(f"methods: {name} needs one of {', '.join(needs)} in the same list")


def apply_methods(model: torch.nn.Module, methods: list[TuningMethod], task: str, tokenizer=None,
                  example_inputs: Callable[[int], list[int]] | None = None) -> None:
    """Freeze everything, then let each method mark or add what trains (`example_inputs(n)`: the first n
    training input tokens, which a prefix may start from). The names of the parameters methods add are kept
    in `model.dstune_added`: they are saved with the trained ones even when frozen (a fixed random projection
    must come back as it was)."""
    base = {n for n, _ in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    _apply_each(model, methods, task, tokenizer, example_inputs)
    refuse_trained_quantized(model)
    model.dstune_added = frozenset(n for n, _ in model.named_parameters() if n not in base)
    model.dstune_generate_kwargs = {k: v for m in methods for k, v in m.generate_kwargs.items()}
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("methods: nothing trains with these methods and options")


def _apply_each(model: torch.nn.Module, methods: list[TuningMethod], task: str, tokenizer,
                example_inputs: Callable[[int], list[int]] | None) -> None:
    from dstune.tasks import TASKS, get_task
    task = get_task(task).model_task if task in TASKS else task  # what the model is (preference: a causal LM)
    for m in methods:
        m.tokenizer, m.example_inputs = tokenizer, example_inputs
        m.apply(model, task)


SHARES_BASE = ("lora", "ia3", "adapter", "prompt", "prefix")  # built-ins that can leave the base frozen


@dataclass
class AdapterSpec:
    """What one adapter of a job applies: its own methods, the task it learns and its classes, and the first
    training input tokens of its data (a prefix may start from them)."""
    methods: list[TuningMethod]
    task: str
    labels: list | None = None
    example_inputs: Callable[[int], list[int]] | None = None


def apply_adapter_methods(model: torch.nn.Module, adapters: dict[str, AdapterSpec], shared: list[TuningMethod],
                          task: str, seed: int, tokenizer=None) -> None:
    """Apply the shared methods once (they stay on the base and train on every adapter's rows), then each
    named adapter's own methods, each from the random state a run of its own would start from (`seed`: the
    one before the base was loaded), and route them (methods/routing.py). A classifier whose head the base
    cannot serve (another label count, a causal LM's base) gets a head of its own (methods/heads.py). Only
    methods that leave the base frozen can share it."""
    from dstune.methods.heads import class_head, head_for
    from dstune.methods.routing import apply_adapters, attach_head, pool_last_token, rng_state, set_rng_state
    from dstune.methods.targets import train_task_head

    for name, methods in [("shared_methods", shared)] + [(n, a.methods) for n, a in adapters.items()]:
        if changer := next((m for m in methods if not m.steps_aside), None):
            where = name if name == "shared_methods" else f"adapters ({name})"
            raise UserError(f"{where}: {changer.label} changes the base's own weights"
                            f"{' with these options' if changer.name in SHARES_BASE else ''}, which every adapter "
                            f"shares; adapters train methods that leave the base frozen ({', '.join(SHARES_BASE)}; "
                            "adapter without train_norms)")
    base = {n for n, _ in model.named_parameters()}
    own_head = class_head(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seeded = rng_state()
    state = [rng_state()]  # where each adapter's methods start: after the base was loaded, and the shared methods

    def apply_shared() -> None:
        _apply_each(model, shared, task, tokenizer, None)
        _freeze_head(own_head)  # heads are never shared: each classifier trains a copy of its own
        state[0] = rng_state()

    def applying(name: str, a: AdapterSpec) -> Callable[[], None]:
        def apply() -> None:
            new = head_for(model, task, len(a.labels or [0, 1])) if a.task == "classification" else None
            set_rng_state(seeded if new is not None and not shared else state[0])
            head = new[0]() if new is not None else None  # drawn first: its own run loads its model, then applies
            trained = {id(p) for p in model.parameters() if p.requires_grad}
            _apply_each(model, a.methods, a.task, tokenizer, a.example_inputs)
            trains_head = a.task == "classification"  # as every method's train_task_head does in its own run
            if head is not None:
                _freeze_head(own_head)
                attach_head(new[1], head.requires_grad_(trains_head), new[2])
            elif trains_head:
                train_task_head(model, "classification")
            if not shared and not any(p.requires_grad and id(p) not in trained for p in model.parameters()):
                raise UserError(f"adapters ({name}): nothing trains with these methods and options")
        return apply
    apply_adapters(model, {name: applying(name, a) for name, a in adapters.items()}, apply_shared if shared else None)
    if task != "classification" and (pooled := {n for n, a in adapters.items() if a.task == "classification"}):
        pool_last_token(model, pooled, model.config.pad_token_id)
    refuse_trained_quantized(model)
    model.dstune_added = frozenset(n for n, _ in model.named_parameters() if n not in base)
    model.dstune_generate_kwargs = {k: v for m in shared for k, v in m.generate_kwargs.items()}


def _freeze_head(head: tuple[str, torch.nn.Module] | None) -> None:
    """The base's task head frozen (its own weights: the adapters' copies below it train)."""
    for p in head[1].parameters(recurse=False) if head is not None else ():
        p.requires_grad_(False)


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # biases and norm weights (1-D) are not decayed, as in BERT/GPT training recipes
    return p.ndim < 2 or "norm" in name.lower()


def param_groups(model: torch.nn.Module, methods: list[TuningMethod], lr: float, weight_decay: float,
                 only: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """Optimizer param groups keyed by (LR scale, decay): one group per distinct pair (of the parameters
    whose names `only` accepts, when given)."""
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (only is not None and not only(name)):
            continue
        scale = 1.0
        for m in methods:
            scale *= m.lr_scale(name)
        decay = weight_decay > 0 and not _no_decay(name, p)
        g = groups.setdefault((scale, decay), {"params": [], "names": [], "lr": lr * scale,
                                               "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 partitioned and 4-bit packed parameters counted whole)."""
    total = sum(param_count(p) for p in model.parameters())
    trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
    return trainable, total
