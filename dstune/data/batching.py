"""Data order and batches: a pure function of (seed, step), so resume and world size never change it.

Each optimizer step takes the next `micro × accum × world` examples of the epoch's permutation;
rank r gets a contiguous slice of that global batch, cut into `accum` micro-batches. One rank with
accum=2 therefore sees exactly the examples two ranks with accum=1 see, and a run resumed at step
s reads the same examples as an uninterrupted run at step s.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

IGNORE = -100  # label id the loss skips (prompt tokens, padding)


class Task(Protocol):
    """What batching needs of a task (dstune/tasks/ sits above this module and provides it)."""
    generative: bool

    def collate_labels(self, rows: list[dict]) -> torch.Tensor: ...


class StepBatches:
    def __init__(self, n_examples: int, micro: int, accum: int, world: int, rank: int, seed: int):
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = n_examples, micro, accum, world, rank, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n_examples // self.global_batch  # the incomplete tail batch is dropped
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._order

    def global_step(self, step: int) -> list[int]:
        """Example indices of the whole global batch of optimizer step `step` (0-based), every rank's."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[within * self.global_batch:(within + 1) * self.global_batch]

    def for_step(self, step: int) -> list[list[int]]:
        """Example indices of this rank's micro-batches for optimizer step `step` (0-based)."""
        start = self.rank * self.micro * self.accum
        mine = self.global_step(step)[start:start + self.micro * self.accum]
        return [mine[a * self.micro:(a + 1) * self.micro] for a in range(self.accum)]


def target_tokens(label_rows: list[list[int]], skip_first: bool) -> int:
    """The tokens a causal LM or seq2seq loss is taken over: labels that are not IGNORE. `skip_first` for a
    causal LM, which predicts token n from tokens < n: a row's first label is no target (unless virtual
    tokens precede it)."""
    return sum(int(np.count_nonzero(np.asarray(labels[int(skip_first):]) != IGNORE)) for labels in label_rows)


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate(rows: list[dict], pad_id: int, task: Task) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized rows to the longest one; the task collates the labels (padded label
    positions are ignored by the loss).

    Packed rows (with `position_ids`) get no attention mask: the positions, restarting at every document,
    tell the model where documents begin; the padding is numbered as one more document of its own."""
    ids = [r["input_ids"] for r in rows]
    if "position_ids" in rows[0]:
        width = max(len(s) for s in ids)
        batch = {"input_ids": pad(ids, pad_id),
                 "position_ids": torch.tensor([list(r["position_ids"]) + list(range(width - len(r["position_ids"])))
                                               for r in rows], dtype=torch.long)}
    else:
        batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0)}
    batch["labels"] = task.collate_labels(rows)
    return batch


def to_device(host: dict[str, torch.Tensor], device, task: Task) -> dict:
    """A collated batch as forward() kwargs on `device`. Generative models run without a KV cache: a forward
    over whole sequences never reuses one, and with a cache transformers ignores packed documents' positions."""
    batch: dict = {k: v.to(device) for k, v in host.items()}
    if task.generative:
        batch["use_cache"] = False
    return batch


def collate_prompts(prompts: list[list[int]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Batch generation inputs; decoder-only models need left padding so every row ends at its last token."""
    return {"input_ids": pad(prompts, pad_id, left=left),
            "attention_mask": pad([[1] * len(p) for p in prompts], 0, left=left)}
