"""A job stopped by Ctrl-C or SIGTERM ends with one line that says where it stopped and that a rerun
resumes, the shell's exit code for the signal, no traceback; the rerun then resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cli_runner import pool_pids
from helpers import lm_recipe, ok, read_metrics, run_cli

pytestmark = pytest.mark.slow  # a real process or pooled ranks, stopped part-way


def _wait_for_steps(run_dir, steps: int, alive) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and alive() and len(read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists()
                                                       else {}) < steps:
        time.sleep(0.1)
    assert alive(), "the job ended before it could be stopped"


def _assert_one_line(stderr: str, signum: int) -> None:
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    [line] = [x for x in stderr.splitlines() if x.startswith("dstune: error:")]
    assert " interrupted at step " in line and "the last checkpoint is step " in line, line
    assert line.endswith("rerun the same command to resume from it"), line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_process_says_so_in_one_line_and_resumes(ws, built_ops, tmp_path, signum):
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=100_000, log_every=1, checkpoint_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "dstune", "train", recipe], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    try:
        _wait_for_steps(tmp_path / "run", 3, lambda: proc.poll() is None)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    _assert_one_line(stderr, signum)
    logged = max(read_metrics(tmp_path / "run"))
    res = ok(run_cli(["train", recipe, f"training.max_steps={logged + 2}"]))
    assert "resumed from step_" in res.stdout
    steps = [s for s in read_metrics(tmp_path / "run")]
    assert steps == list(range(1, logged + 3))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stopped_ranks_say_so_in_one_line(ws, built_ops, tmp_path, signum):
    """Both ranks get the signal, as from a launcher passing SIGTERM on or Ctrl-C to a process group: rank 0
    says the one line, every rank ends with the signal's exit code."""
    recipe = lm_recipe(ws, tmp_path, "run", 2, max_steps=100_000, log_every=1, checkpoint_every=1)
    pids = pool_pids(2)
    done: dict = {}
    job = threading.Thread(target=lambda: done.update(res=run_cli(["train", recipe], nproc=2, timeout=300)))
    job.start()
    _wait_for_steps(tmp_path / "run", 3, job.is_alive)
    for pid in pids:
        os.kill(pid, signum)
    job.join(120)
    res = done["res"]
    assert res.returncode == 128 + signum, res.stderr[-3000:]
    _assert_one_line(res.ranks[0][1], signum)
    assert "Traceback" not in res.ranks[1][1] and "dstune: error" not in res.ranks[1][1], res.ranks[1][1][-3000:]
