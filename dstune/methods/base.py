"""The tuning-method contract: what trains, how it is optimised, what is saved."""
from __future__ import annotations

import contextlib
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from dstune.errors import UserError


@contextlib.contextmanager
def base_model_only(model: torch.nn.Module):
    """Within it, the methods that leave the base frozen (`steps_aside`: added inputs, virtual tokens and
    prefixes, and added modules, LoRA, IA3, adapters) step aside: the model computes what its base does.
    Every module is flagged, since each method's hook looks at the module it sits on."""
    modules = list(model.modules())
    was = [bypassed(m) for m in modules]  # nested (a reference scored while the base is): restore, not clear
    for m in modules:
        m.dstune_bypass = True
    try:
        yield model
    finally:
        for m, before in zip(modules, was):
            m.dstune_bypass = before


def bypassed(module: torch.nn.Module) -> bool:
    """Whether `module` is inside `base_model_only` (a method's hook then leaves its output alone)."""
    return module.__dict__.get("dstune_bypass", False)


@contextlib.contextmanager
def gathered_module_by_module(model: torch.nn.Module):
    """Under ZeRO-3 (partitioned parameters, before DeepSpeed's engine exists): a forward inside it gathers
    each module's own parameters for that module's call alone, as the engine does, so no rank ever holds the
    whole model. Every rank must run the same forward (the gathers are collective)."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield model
        return
    import deepspeed
    opened: list = []

    def gather(module, args):
        own = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        opened.append(deepspeed.zero.GatheredParameters(own) if own else contextlib.nullcontext())
        opened[-1].__enter__()

    def release(module, args, output):
        opened.pop().__exit__(None, None, None)

    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(gather), m.register_forward_hook(release))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        while opened:  # a forward that raised
            opened.pop().__exit__(None, None, None)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TuningMethod:
    """A plugin that decides which parameters of a loaded model train.

    Subclasses set `name`, `description` (one line, shown by `dstune methods`) and
    `Options` (a pydantic model whose field descriptions document the options).
    The model arrives fully frozen; `apply` marks or adds what trains.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    order: ClassVar[int] = 1                       # 0: decides base weights, 1: adds modules, 2: shapes LRs
    conflicts: ClassVar[dict[str, str]] = {}       # other method name → why the pair is impossible
    needs_one_of: ClassVar[tuple[str, ...]] = ()   # methods this one only makes sense with
    mergeable: ClassVar[bool] = True               # can `dstune export --format merged` fold it into the base
    generate_kwargs: ClassVar[dict] = {}           # what `model.generate` needs with this method applied
    steps_aside: ClassVar[bool] = False            # leaves the base's weights as they are and can step aside
                                                   # (`base_model_only`): the base is a free reference model
    trains_base_weights: ClassVar[bool] = False    # trains weights the base holds (so not a quantized base)
    first_label_is_target: ClassVar[bool] = False  # virtual tokens precede the input, so a causal LM predicts
                                                   # its first token too (the loss counts one more target)
    changes_output_at_init: bool = False           # the model differs from its base before any step (virtual
                                                   # tokens; a method may set it per instance from its options):
                                                   # the untouched base is scored too, and the method's hooks
                                                   # step aside under `base_model_only`
    tokenizer = None                               # the run's tokenizer, set before `apply`
    example_inputs: Callable[[int], list[int]] | None = None  # the run's first n training input tokens, set
                                                              # before `apply` where the run has data

    def __init__(self, options: BaseModel):
        self.options = options

    @property
    def label(self) -> str:
        """What logs call this method: its name, and a variant its options choose (e.g. `lora (DoRA)`)."""
        return self.name

    def apply(self, model: torch.nn.Module, task: str) -> None:
        """Set requires_grad on existing parameters and/or add trainable modules."""
        raise NotImplementedError

    def init_ids(self, from_data: bool = False) -> torch.Tensor | None:
        """The tokens a prompt or prefix starts from, repeated or cut to `options.num_virtual_tokens`: those of
        `options.init_text`, else (`from_data`) the run's first training inputs, else None (a random start;
        also where the run has no data: a reloaded run dir, whose trained weights replace the start)."""
        P = self.options.num_virtual_tokens
        if self.options.init_text:
            if self.tokenizer is None:
                raise UserError(f"methods ({self.name}).init_text: needs the run's tokenizer")
            ids = self.tokenizer(self.options.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise UserError(f"methods ({self.name}).init_text: the text has no tokens")
        elif from_data and self.example_inputs is not None:
            ids = self.example_inputs(P)
        else:
            ids = []
        return torch.tensor((ids * (P // len(ids) + 1))[:P]) if ids else None

    def lr_scale(self, param_name: str) -> float:
        """Multiplier on the base LR for one trainable parameter (1.0 unless the method says otherwise)."""
        return 1.0

    def merged_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Base-model tensors with this method's trained change folded in (only those it changes)."""
        return {}

    def peft_adapter(self, model: torch.nn.Module, task: str):
        """This method's trained state as a PEFT adapter (a `methods.peft_format.PeftAdapter`), or None where
        PEFT has no equivalent (`dstune export --format peft` says so)."""
        return None

    @classmethod
    def bench_presets(cls) -> dict[str, list[dict]]:
        """What names on `dstune bench --methods` train: name → the recipe's `methods:` list for it."""
        return {cls.name: [{"name": cls.name}]}

    @classmethod
    def bench_overrides(cls) -> dict[str, list[str]]:
        """Recipe overrides a preset of `bench_presets` runs with (`key=value`, e.g. a quantized base)."""
        return {}

    @classmethod
    def exports_to_peft(cls) -> bool:
        return cls.peft_adapter is not TuningMethod.peft_adapter


def has_values(t: torch.Tensor) -> bool:
    """False for tensors that are shapes only (the meta device, fake tensors: the memory estimate)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return not (t.is_meta or isinstance(t, FakeTensor))
