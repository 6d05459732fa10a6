"""A run dir that can be written, that belongs to one job (its rank 0 holds an OS lock on RUN_DIR/.lock for
the run's life) and that a rerun resumes only with the recipe that made it."""
from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path
from typing import Any

from dstune.errors import UserError

LOCK = ".lock"


def check_output_dir(run_dir: Path) -> None:
    """Fail before anything is written when `run_dir` cannot be a run dir: a file, under a file, or under a
    folder this process may not write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir: {run_dir} is a file, not a folder")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output_dir: {run_dir} would be made under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: {parent} is not writable here (read-only, or another user's)")


HOSTFILE, ENV_FILE = "hostfile", "deepspeed_env"  # what `dstune launch` may write into a run dir for DeepSpeed
LAUNCH_FILES = (HOSTFILE, ENV_FILE)


def fresh_run_dir(run_dir: Path) -> bool:
    """Not there yet, or holding only what `dstune launch` wrote to start this job (and Slurm's log)."""
    return not run_dir.is_dir() or all(p.name in LAUNCH_FILES or p.name.startswith("slurm-")
                                       for p in run_dir.iterdir())


def forget_fresh_run_dir(run_dir: Path) -> None:
    """After a job that never started training: remove what it wrote into a fresh run dir (the launch files
    too; Slurm's log, which says why, stays)."""
    import shutil

    for p in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if not p.name.startswith("slurm-"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        run_dir.rmdir()  # only when nothing is left
    except OSError:
        pass


def hold_run_dir(run_dir: Path) -> int:
    """Lock `run_dir` (made if needed) for this process; the returned descriptor keeps the lock until it is
    closed or the process ends, however it ends (the kernel releases it: a killed job never leaves a run dir
    locked). Another live job holding it is an error naming its host and pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"output_dir: {run_dir} is in use by a running job ({owner}); wait for it to end, "
                        "stop it, or choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


# keys a resumed run may change: how long it runs, how it saves, logs, evaluates and waits, where the data
# cache is; the base model may move (its content is checked by fingerprint). Anything else would make the
# resumed run something the checkpoints were not trained as.
RESUME_MAY_CHANGE = ("training.max_steps", "training.epochs", "training.checkpoint_every", "training.keep_checkpoints",
                     "training.save_final", "training.resume", "training.dist_timeout_s", "training.build_timeout_s",
                     "training.nan_policy", "training.log_every", "training.profile_step", "evaluation.", "data.num_proc", "data.cache_dir",
                     "model.path", "logging.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if prefix == "adapters." and isinstance(tree, list):  # each adapter's keys: adapters[NAME].training.lr
        return {k: v for a in tree for k, v in _flat(a, f"adapters[{_name(a)}].").items()}
    return {prefix[:-1]: tree}


def _name(adapter: Any) -> str:
    return str(adapter.get("name")) if isinstance(adapter, dict) else str(adapter)


def _may_change(key: str) -> bool:
    """RESUME_MAY_CHANGE holds for the job's keys and for each adapter's own (adapters[NAME].training.max_steps)."""
    return re.sub(r"^adapters\[[^]]*\]\.", "", key).startswith(RESUME_MAY_CHANGE) and not key.endswith("].name")


def _known(key: str, saved: dict) -> bool:
    """Whether the saved recipe has `key` or a value where its section is now (e.g. data.eval: null). A key it
    lacks entirely came with a later dstune, and the run was made with that key's default."""
    if key.startswith("adapters["):  # an adapter added or dropped is a change, whatever keys it has
        return any(k.startswith("adapters[") for k in saved)
    parts = key.split(".")
    return any(".".join(parts[:i]) in saved for i in range(1, len(parts) + 1))


def check_recipe_matches(run_dir: Path, current: dict, base: str) -> None:
    """Before a resume writes anything: the recipe must be the one RUN_DIR/config.yaml saved, but for the
    keys in RESUME_MAY_CHANGE (else the differing keys are named), and the base model the one run.json
    recorded (`base`: its fingerprint now; checkpoints hold only what trains)."""
    import json

    import yaml

    try:
        recorded = json.loads((run_dir / "run.json").read_text()).get("base_fingerprint")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and recorded != base:
        raise UserError(f"model: the base model differs from the one {run_dir}'s checkpoints were trained on "
                        f"(fingerprint {base}, recorded {recorded}); point model.path back at it, or start over "
                        "with training.resume=false")

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return  # no saved recipe (a run dir from before config.yaml was written): nothing to compare
    old, new = _flat(saved), _flat(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and _known(k, old)
                     and not _may_change(k))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:4])
        raise UserError(f"output_dir: {run_dir} holds checkpoints of another recipe; it differs in {shown}"
                        f"{' and more' if len(changed) > 4 else ''}. Rerun with the recipe that made it, choose "
                        "another output_dir, or set training.resume=false to start over")
