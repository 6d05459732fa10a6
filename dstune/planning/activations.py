"""Activation memory by tracing: one forward and backward of the recipe's model on fake tensors.

Fake tensors carry shapes, dtypes and devices but no data, so a 1B-parameter model traces in about a
second with no memory. A dispatch mode records every storage the step creates and frees (by weak
reference, as autograd drops it), giving the live bytes over time: what the graph holds after the
forward (saved activations, logits, loss temporaries) and the peak during the backward, when the
gradients of the activations come and go. This follows the model's real code, so SwiGLU, GQA, flash
attention's saved log-sum-exp, frozen layers that save no input, the chunked loss and activation
checkpointing (recomputed per layer in the backward) come out as they are, not as a rule of thumb.

The trace runs on CPU fake tensors, where SDPA takes its flash path for causal attention without an
explicit mask, as on a GPU; parameter gradients are dropped as they are made (DeepSpeed moves them into
its own buffers), so they count under `gradients`, not here.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves



class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode that are still alive, and their peak.

    Storages that existed before (parameters, buffers, inputs) are not counted.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._existing or key in self._alive:
            return  # a view or an in-place result: no new memory
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        self._alive[key] = weakref.ref(storage, lambda _, key=key, n=n: self._free(key, n))

    def _free(self, key: int, n: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= n


@dataclass
class ActivationTrace:
    after_forward: int   # bytes the forward leaves alive for the backward (saved activations, logits, loss)
    peak: int            # most bytes alive at once over forward + backward


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build parameters in the training dtype, as DeepSpeed's engine casts them (bf16/fp16 runs)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def masks_as_in_a_real_step() -> Iterator[None]:
    """transformers treats fake tensors as graph tracing and then builds an explicit S x S attention mask,
    as it cannot read values to prove the mask is plain causal; a real step skips the mask and runs flash
    attention. Here fake tensors count as eager, and the example rows (one sequence each, no padding) are
    declared unpacked, the one value-dependent check left, so the trace takes the real step's path."""
    import transformers.masking_utils as masking

    saved = {name: getattr(masking, name) for name in ("is_tracing", "find_packed_sequence_indices")
             if hasattr(masking, name)}
    if "is_tracing" in saved:
        masking.is_tracing = lambda tensor=None: saved["is_tracing"]()  # dynamo/jit/stream capture still count
    if "find_packed_sequence_indices" in saved:
        masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(masking, name, fn)


def run_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: TorchDispatchMode,
             after_forward: Callable[[], None] = lambda: None) -> None:
    """One training forward + backward under a dispatch mode; `after_forward` runs between the two.

    Parameter gradients are dropped as they are made (DeepSpeed moves them into its own buffers)."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def drop(p: torch.Tensor) -> None:
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(drop) for p in trainable]
    try:
        model.train()
        with masks_as_in_a_real_step(), mode:
            loss = model(**batch).loss
            after_forward()
            loss.backward()
            del loss
    finally:
        for h in hooks:
            h.remove()


def trace_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ActivationTrace:
    """Live bytes of one training forward + backward (fake tensors for the estimate, real ones in tests)."""
    mem = LiveBytes([*model.parameters(), *model.buffers(), *batch.values()])
    forward_left: list[int] = []
    run_step(model, batch, mem, lambda: forward_left.append(mem.live))
    return ActivationTrace(after_forward=forward_left[0], peak=mem.peak)
