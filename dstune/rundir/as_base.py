"""A finished run as the next run's base: `model.path: RUN_DIR` (e.g. an SFT run under a preference recipe),
so SFT → DPO is two commands. The run's merged weights (its base with what trained folded in, as `dstune
export --format merged` writes them, tokenizer and chat template included) are written once into RUN_DIR/merged
and written again only when the run's trained weights change; the recipe's model.path then points there
(config.yaml records that folder)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from dstune.config import RunConfig
from dstune.errors import UserError
from dstune.methods import build_methods
from dstune.rundir.load import finished_recipe, is_run_dir
from dstune.rundir.trainable import TRAINABLE

MERGED = "merged"
STAMP = "dstune-merged-from.json"  # which trained weights the folder holds
POLL_S = 0.5


def _source(run_dir: Path) -> dict:
    st = (run_dir / TRAINABLE).stat()
    return {"trainable": str(run_dir / TRAINABLE), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def base_from_run(cfg: RunConfig, local_rank: int = 0, timeout_s: float = 600) -> RunConfig:
    """`cfg` with model.path a plain model folder: a run dir's merged weights (written by the node's local
    rank 0 when missing or stale; the other ranks wait for them), else `cfg` as it is."""
    run_dir = Path(cfg.model.path) if cfg.model.path else None
    if run_dir is None or not is_run_dir(run_dir):
        return cfg
    if not (run_dir / TRAINABLE).is_file():
        raise UserError(f"model.path: {run_dir} is a dstune run dir that has not finished (no {TRAINABLE})")
    folder, want = run_dir / MERGED, _source(run_dir)
    if not _holds(folder, want):
        if local_rank == 0:
            _write_merged(run_dir, folder, want)
        else:
            _wait_for(folder, want, timeout_s)
    if local_rank == 0 and int(os.environ.get("RANK", "0")) == 0:
        print(f"[dstune] model.path: {run_dir} is a dstune run dir: training on its merged weights ({folder})",
              flush=True)
    model = cfg.model.model_copy(update={"path": str(folder), "gguf_file": None, "tiny": None, "config_overrides": {}})
    return cfg.model_copy(update={"model": model})


def base_model_of_run(cfg: RunConfig) -> RunConfig:
    """`cfg` with a run dir's own model settings where model.path is a run dir (the merged weights have its
    base's shapes): what the memory estimate reads, without writing any weights."""
    run_dir = Path(cfg.model.path) if cfg.model.path else None
    if run_dir is None or not is_run_dir(run_dir):
        return cfg
    # the run's model, held as this recipe says (its merged weights are full precision)
    model = finished_recipe(str(run_dir)).model.model_copy(update={"quantize": cfg.model.quantize})
    return cfg.model_copy(update={"model": model})


def _holds(folder: Path, want: dict) -> bool:
    try:
        return json.loads((folder / STAMP).read_text()) == want
    except (OSError, ValueError):
        return False


def _write_merged(run_dir: Path, folder: Path, want: dict) -> None:
    from dstune.rundir.export import export

    blocked = [m.name for m in build_methods(finished_recipe(str(run_dir)).methods) if not m.mergeable]
    if blocked:
        raise UserError(f"model.path: {run_dir} trained {', '.join(blocked)}, which cannot be folded into the base "
                        "weights; train on top of it by naming its base as model.path and its methods again")
    tmp = run_dir / f".{MERGED}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    export(str(run_dir), str(tmp), "merged")
    (tmp / STAMP).write_text(json.dumps(want))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another node sharing the filesystem renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _holds(folder, want):
            raise


def _wait_for(folder: Path, want: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _holds(folder, want):
        if time.monotonic() > deadline:
            raise UserError(f"model.path: waited {timeout_s:.0f} s for local rank 0 to write {folder}")
        time.sleep(POLL_S)
