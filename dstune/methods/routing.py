"""Several named adapters over one base model: each adapter's methods are applied in turn, exactly as a run of
its own applies them, and what they add is moved aside into the adapter's slot on each module they touched
(`module.dstune_adapters[NAME]`): their modules, attributes and forward hooks, and a copy of a task head they
train. `route(model, NAME)` puts one adapter's back for the forwards inside it; outside, the model is its base.

So every method works with adapters without knowing of them: its hooks find `module.lora_A` (or the prompt,
the prefix, the gate) where they always do, and an adapter's parameters take part only in its own forwards.
The slot's modules stay registered below the module they belong to, so ZeRO-3 partitions and gathers them
like any layer and a state dict names them `...q_proj.dstune_adapters.NAME.lora_A.weight`
(`adapter_state_names` maps those back to the names a run of its own uses).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from dstune.errors import UserError

SLOTS = "dstune_adapters"   # the ModuleDict of per-adapter slots on a module
HEAD = "dstune_head"        # an adapter's own copy of a task head it trains
RUNTIME = "_dstune"         # what a method's hook sets on a module during a forward is named _dstune_*


class Slot(nn.Module):
    """What one adapter added to one module: modules (children of the slot), attributes and forward hooks."""

    def __init__(self):
        super().__init__()
        self.attrs: dict = {}
        self.pre_hooks: list[tuple[Callable, bool]] = []   # (hook, takes kwargs)
        self.hooks: list[tuple[Callable, bool]] = []
        self.runtime: dict = {}  # attributes its hooks set on the module during its last forward (a prefix's keys)


class Router:
    """Which adapter the model computes now (None: the base), or which rows each adapter computes
    (`segments`: (adapter, first row, end row) over the whole batch, in order), shared by the routing hooks
    of every module."""

    def __init__(self):
        self.active: str | None = None
        self.segments: list[tuple[str, int, int]] | None = None


def apply_adapters(model: nn.Module, adapters: dict[str, Callable[[], None]],
                   shared: Callable[[], None] | None = None) -> Router:
    """Call `shared()` (which applies the methods every adapter shares: they stay on the base), then each
    adapter's `apply()` (which applies its methods to `model`, base frozen) in turn and move what it added into
    that adapter's slots; then install the routing hooks. Returns the model's router."""
    for p in model.parameters():
        p.requires_grad_(False)
    if shared is not None:
        shared()
    common = {id(p) for p in model.parameters() if p.requires_grad}
    for name, apply in adapters.items():
        before = {id(m): _snapshot(m) for m in model.modules()}
        apply()
        for module_name, module in list(model.named_modules()):
            if id(module) in before and not _in_slot(module_name):
                _stash(module, module_name, name, before[id(module)], common)
    router = Router()
    for module in model.modules():
        if SLOTS in module._modules:
            module.register_forward_pre_hook(_routed_pre_hook(router), with_kwargs=True)
            module.register_forward_hook(_routed_hook(router), with_kwargs=True)
    model.dstune_router = router
    model.dstune_checkpoint_kwargs = {"context_fn": routed_checkpointing(model)}
    return router


def attach_head(module: nn.Module, head: nn.Linear, own_name: str | None = None) -> None:
    """Make `head` compute `module`'s output (during an `apply()` of apply_adapters: the adapter's slot
    takes it); `own_name`: the name its own run gives the head, where it is not the module's."""
    module.add_module(HEAD, head)
    module.register_forward_hook(_head_output)
    if own_name is not None:
        module.dstune_head_as = own_name


def pool_last_token(model: nn.Module, adapters: set[str], pad_id: int) -> None:
    """For `adapters` (classifiers over a causal LM's base): the model's logits, one row of scores per token,
    become each row's scores at its last token that is not padding, as transformers' decoder-only classifiers
    pool them."""
    router: Router = model.dstune_router

    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        names = {router.active} if router.segments is None else {name for name, _, _ in router.segments}
        if not names & adapters:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output.logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        if ids is None or pad_id is None:  # input embeddings (a soft prompt's): the last position, as transformers
            output.logits = logits[:, -1]
            return output
        last = (torch.arange(ids.shape[-1], device=logits.device) * (ids != pad_id).to(logits.device)).argmax(-1)
        output.logits = logits[rows, last]
        return output
    model.register_forward_hook(hook, with_kwargs=True)


def _in_slot(module_name: str) -> bool:
    return SLOTS in module_name.split(".")


def _snapshot(module: nn.Module) -> tuple[set, set, set, set]:
    return (set(module._modules), set(module.__dict__), set(module._forward_pre_hooks), set(module._forward_hooks))


def _stash(module: nn.Module, module_name: str, adapter: str, before: tuple[set, set, set, set],
           common: set[int]) -> None:
    """Move what adapter `adapter` added to `module` (and a task head of the base it made trainable) into the
    module's slot for it; `common`: the shared methods' parameters (ids), which stay."""
    children, attrs, pre, post = before
    slot = Slot()
    # in the order they were added: every rank must list the parameters alike (DeepSpeed broadcasts them in order)
    for key in [k for k in module._modules if k not in children and k != SLOTS]:
        slot.add_module(key, module._modules.pop(key))
    for key in [k for k in module.__dict__ if k not in attrs and k != "dstune_bypass"]:  # base_model_only's flag
        slot.attrs[key] = module.__dict__.pop(key)
    for key in [k for k in module._forward_pre_hooks if k not in pre]:
        hook = module._forward_pre_hooks.pop(key)
        slot.pre_hooks.append((hook, module._forward_pre_hooks_with_kwargs.pop(key, False)))
    for key in [k for k in module._forward_hooks if k not in post]:
        slot.hooks.append((module._forward_hooks.pop(key), module._forward_hooks_with_kwargs.pop(key, False)))
        module._forward_hooks_always_called.pop(key, None)
    trained = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in common]
    if trained:
        if not isinstance(module, nn.Linear):
            raise UserError(f"adapters ({adapter}): its methods train the base's own {module_name or 'model'}."
                            f"{trained[0][0]}; with adapters only methods that leave the base frozen train")
        slot.add_module(HEAD, _copy_linear(module))
        slot.hooks.append((_head_output, False))
        for _, p in trained:
            p.requires_grad_(False)
    if len(slot._modules) or slot.attrs or slot.pre_hooks or slot.hooks:
        if SLOTS not in module._modules:
            module.add_module(SLOTS, nn.ModuleDict())
        module._modules[SLOTS][adapter] = slot


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    """A trainable copy of a task head (gathered whole under ZeRO-3; deepspeed.initialize partitions it)."""
    import deepspeed

    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    with deepspeed.zero.GatheredParameters(params):
        shape = getattr(layer.weight, "ds_shape", layer.weight.shape)
        copy = nn.Linear(shape[1], shape[0], bias=layer.bias is not None, device=layer.weight.device,
                         dtype=layer.weight.dtype)
        with torch.no_grad():
            copy.weight.copy_(layer.weight)
            if layer.bias is not None:
                copy.bias.copy_(layer.bias)
    return copy


def _head_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    from dstune.methods.base import bypassed
    return output if bypassed(module) else getattr(module, HEAD)(args[0])


def _active_slot(module: nn.Module, router: Router) -> Slot | None:
    slots = module._modules[SLOTS]
    return slots[router.active] if router.active is not None and router.active in slots else None


def _routed_pre_hook(router: Router):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if router.segments is not None:
            return _segments_pre_hook(module, args, kwargs, router.segments)
        slot = _active_slot(module, router)
        if slot is None:
            return None
        for fn, with_kwargs in slot.pre_hooks:
            out = fn(module, args, kwargs) if with_kwargs else fn(module, args)
            if out is not None:
                if with_kwargs:
                    args, kwargs = out
                else:
                    args = out if isinstance(out, tuple) else (out,)
        return args, kwargs
    return hook


def _routed_hook(router: Router):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        if router.segments is not None:
            return _segments_hook(module, args, kwargs, output, router.segments)
        slot = _active_slot(module, router)
        if slot is None:
            return None
        for fn, with_kwargs in slot.hooks:
            out = fn(module, args, kwargs, output) if with_kwargs else fn(module, args, output)
            output = output if out is None else out
        return output
    return hook


def _rows(t, segment: tuple[str, int, int], batch_rows: int):
    """A segment's rows of a tensor whose first dimension is the batch's rows (or rows × tokens, where a
    layer flattens them); anything else as it is."""
    if not torch.is_tensor(t) or not t.dim() or t.shape[0] % batch_rows:
        return t
    per_row = t.shape[0] // batch_rows
    return t[segment[1] * per_row:segment[2] * per_row]


def _segments_pre_hook(module: nn.Module, args: tuple, kwargs: dict, segments: list[tuple[str, int, int]]):
    slots = module._modules[SLOTS]
    if not any(name in slots and slots[name].pre_hooks for name, _, _ in segments):
        return None
    rows, pieces = segments[-1][2], []
    for segment in segments:
        mine = tuple(_rows(a, segment, rows) for a in args)
        slot = slots[segment[0]] if segment[0] in slots else None
        if slot is not None and slot.pre_hooks:
            with _bound(module, slot):
                for fn, with_kwargs in slot.pre_hooks:
                    out = fn(module, mine, kwargs) if with_kwargs else fn(module, mine)
                    if out is not None:
                        mine = out[0] if with_kwargs else out if isinstance(out, tuple) else (out,)
        pieces.append(mine[0])
    return (torch.cat(pieces), *args[1:]), kwargs


def _segments_hook(module: nn.Module, args: tuple, kwargs: dict, output, segments: list[tuple[str, int, int]]):
    """Each segment's rows of the module's output through its adapter's hooks (one small computation per
    adapter over its rows beside the base's one over all rows: the punica / S-LoRA layout)."""
    slots = module._modules[SLOTS]
    if not any(name in slots and slots[name].hooks for name, _, _ in segments):
        return None
    rows, pieces = segments[-1][2], []
    for segment in segments:
        piece = _rows(output, segment, rows)
        slot = slots[segment[0]] if segment[0] in slots else None
        if slot is not None and slot.hooks:
            mine = tuple(_rows(a, segment, rows) for a in args)
            with _bound(module, slot):
                for fn, with_kwargs in slot.hooks:
                    out = fn(module, mine, kwargs, piece) if with_kwargs else fn(module, mine, piece)
                    piece = piece if out is None else out
        pieces.append(piece)
    return torch.cat(pieces)


@contextlib.contextmanager
def _bound(module: nn.Module, slot: Slot) -> Iterator[None]:
    own = {**dict(slot.named_children()), **slot.attrs}
    for key, value in own.items():
        object.__setattr__(module, key, value)
    try:
        yield
    finally:
        for key in own:
            module.__dict__.pop(key, None)


def draws_dropout(model: nn.Module) -> bool:
    """Whether a training forward draws dropout masks (a Dropout module or a config's dropout rate above 0).
    Adapters then keep forwards of their own: masks drawn for a shared batch would differ from those each
    adapter's own run draws."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    values = config.to_dict().items() if config is not None else ()
    return any(("dropout" in k or k.endswith("pdrop")) and isinstance(v, (int, float)) and not isinstance(v, bool)
               and v > 0 for k, v in values)


def row_local(model: nn.Module, adapter: str) -> bool:
    """Whether the adapter's methods act on each row's activations alone, inside the model's layers (LoRA,
    IA3, bottleneck adapters, a task head): its rows can share a forward with other adapters' rows. Soft
    prompts and prefixes change the input and the attention: their adapter runs forwards of its own."""
    return adapter not in model._modules.get(SLOTS, {})


@contextlib.contextmanager
def route_rows(model: nn.Module, segments: list[tuple[str, int, int]]) -> Iterator[None]:
    """Within it one forward computes several row-local adapters, each over its own rows of the batch
    (`segments`: (adapter, first row, end row), covering the batch in order)."""
    router: Router = model.dstune_router
    if router.active is not None or router.segments is not None:
        raise RuntimeError("an adapter is routed already")
    router.segments = segments
    try:
        yield
    finally:
        router.segments = None


@contextlib.contextmanager
def route(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Within it `model` computes `adapter` (None: the base): its modules and attributes are where its
    methods put them and its hooks run. What its hooks set on modules during a forward (`_dstune_*`: a
    prefix's keys and values) is kept with the adapter when it leaves and put back when it returns (a
    recomputed checkpointed layer sees it as the forward did)."""
    router: Router = model.dstune_router
    if router.active is not None or router.segments is not None:
        raise RuntimeError("an adapter is routed already")
    bound = []
    for module in model.modules():
        if SLOTS in module._modules and adapter in module._modules[SLOTS]:
            slot = module._modules[SLOTS][adapter]
            before = set(module.__dict__)
            for key, value in {**dict(slot.named_children()), **slot.attrs, **slot.runtime}.items():
                object.__setattr__(module, key, value)  # into __dict__: found first, never registered twice
            bound.append((module, slot, before))
    router.active = adapter
    try:
        yield
    finally:
        router.active = None
        for module, slot, before in bound:
            own = set(dict(slot.named_children())) | set(slot.attrs)
            slot.runtime = {k: module.__dict__[k] for k in set(module.__dict__) - before - own
                            if k.startswith(RUNTIME)}
            for key in (set(module.__dict__) - before) & (own | set(slot.runtime)):
                del module.__dict__[key]


def routed_checkpointing(model: nn.Module):
    """`context_fn` for torch's (non-reentrant) activation checkpointing: a layer recomputed in the backward
    computes the adapter it computed in the forward (the backward runs after every adapter's forward)."""
    from torch.utils.checkpoint import noop_context_fn

    def context_fn():
        router = model.dstune_router
        if router.segments is not None:
            return contextlib.nullcontext(), _rerouted(model, None, router.segments)
        if router.active is None:
            return noop_context_fn()
        return contextlib.nullcontext(), _rerouted(model, router.active, None)
    return context_fn


@contextlib.contextmanager
def _rerouted(model: nn.Module, adapter: str | None, segments: list | None) -> Iterator[None]:
    router = model.dstune_router
    if router.active == adapter and router.segments == segments:
        yield
        return
    with route(model, adapter) if adapter is not None else route_rows(model, segments):
        yield


def adapter_state_names(model: nn.Module, adapter: str) -> dict[str, str]:
    """{name in the job's model: the name a run of its own gives it} for `adapter`'s parameters."""
    own = {}
    for module_name, module in model.named_modules():
        slots = module._modules.get(SLOTS)
        if slots is None or adapter not in slots:
            continue
        slot, prefix = slots[adapter], f"{module_name}." if module_name else ""
        for name, _ in slot.named_parameters():
            head = name.split(".")[0] == HEAD
            as_ = slot.attrs.get("dstune_head_as", module_name) if head else None
            own[f"{prefix}{SLOTS}.{adapter}.{name}"] = (as_ + name[len(HEAD):]) if head else f"{prefix}{name}"
    return {name: own[name] for name, _ in model.named_parameters() if name in own}


def rng_state() -> tuple:
    """The random state (CPU and every GPU): each adapter draws its initial values and its dropout as a run of
    its own would."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
