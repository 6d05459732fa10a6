"""preference.reference: precompute. The reference log-probabilities of every training and held-out reply,
computed once with the methods stepped aside (before any step and before a resumed run loads its
checkpoint, so the model is the base) and kept in the prepared data's cache entry beside the rows, keyed by
the base model and the precision. Training then holds one model and runs one forward per micro-batch."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from dstune.data.batching import to_device
from dstune.engine.distributed import barrier, gather_objects, shard_batches
from dstune.preference.objective import SteppedAside
from dstune.tasks import get_task

COLUMNS = {"pairs": ("ref_logps", "ref_rejected_logps"), "kto": ("ref_logps", "ref_kl_logps")}


def reference_file(folder: Path, base: str, precision: str) -> Path:
    key = hashlib.blake2b(f"{base}:{precision}".encode(), digest_size=8).hexdigest()
    return folder / f"reference-logps-{key}.npz"


def precompute_reference(job, folder: Path, base: str) -> None:
    """Add the reference columns to job.data's rows: read from `folder`, or computed by every rank (each its
    share) and written there by rank 0."""
    path = reference_file(folder, base, job.cfg.training.precision)
    if not path.is_file():
        splits = {name: _logps_of(job, ds, name) for name, ds in (("train", job.data.train), ("eval", job.data.eval))
                  if ds is not None}
        if job.dist.is_main:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
            np.savez(tmp, **{f"{split}.{k}": v for split, columns in splits.items() for k, v in columns.items()})
            os.replace(tmp, path)
        barrier()
    saved = np.load(path)
    for split in ("train", "eval"):
        ds = getattr(job.data, split)
        if ds is None:
            continue
        for column in COLUMNS[_kind(job)]:
            ds = ds.add_column(column, saved[f"{split}.{column}"].tolist())
        setattr(job.data, split, ds)
    if job.dist.is_main:
        print(f"[dstune] reference log-probabilities (preference.reference: precompute): {path}", flush=True)


def _kind(job) -> str:
    return "kto" if job.cfg.preference.loss == "kto" else "pairs"


@torch.no_grad()
def _logps_of(job, ds, split: str) -> dict[str, np.ndarray]:
    """The reference's summed log-probabilities of each row's replies, from this rank's share of the batches,
    gathered on every rank."""
    from tqdm.auto import tqdm

    reference, task = SteppedAside(), get_task(job.cfg.task)
    first, second = COLUMNS[_kind(job)]
    mine: list[tuple[int, float, float]] = []
    batches = shard_batches(len(ds), job.dist.rank, job.dist.world, job.cfg.evaluation.batch_size)
    for batch_ix in tqdm(batches, desc=f"reference {split}", disable=not job.dist.is_main, leave=False):
        rows = [ds[i] for i, _ in batch_ix]
        batch = to_device(task.collate(rows, job.tokenizer.pad_token_id), job.dist.device, task)
        a = reference.logps(job.engine, batch).sum.tolist()
        b = reference.logps(job.engine, batch, "kl_").sum.tolist() if _kind(job) == "kto" else a[len(rows):]
        mine += [(i, a[k], b[k]) for k, (i, keep) in enumerate(batch_ix) if keep]
    out = np.zeros((2, len(ds)), dtype=np.float64)
    for part in gather_objects(mine):
        for i, x, y in part:
            out[:, i] = (x, y)
    return {first: out[0], second: out[1]}
