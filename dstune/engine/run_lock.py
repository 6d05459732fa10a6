"""One job per run dir: the job's rank 0 holds an OS lock on RUN_DIR/.lock for the run's life."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from dstune.errors import UserError

LOCK = ".lock"


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
