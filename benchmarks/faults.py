"""The fault matrix: what a 2-rank CPU job does when a rank or its launcher is killed, stopped or
interrupted, how long it takes to exit, and whether the rerun resumes on the uninterrupted run's losses.

    python benchmarks/faults.py [--stage 2] [--out DIR]

Each case starts `torchrun --nproc_per_node 2 -m dstune train` on a tiny GPT-2 (random token data,
ZeRO-`--stage`, a checkpoint every 10 steps, `training.dist_timeout_s` 10), waits until step 25 is logged,
injects the fault and times the job's end (the launcher's exit, and the last rank's). Then the same
command runs again to the end; its losses after the step it resumed from are compared with an
uninterrupted run of the same recipe. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

STEPS, EVERY, FAULT_AT, TIMEOUT_S = 60, 10, 25, 10


def recipe(out: Path, name: str, stage: int) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(json.dumps({
        "task": "causal_lm", "model": {"tiny": "gpt2", "config_overrides": {"vocab_size": 512}},
        "data": {"train": "random", "max_length": 64}, "deepspeed": {"zero_optimization": {"stage": stage}},
        "training": {"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-3, "seed": 3, "checkpoint_every": EVERY,
                     "dist_timeout_s": TIMEOUT_S}, "output_dir": str(out / name)}))
    return path


def start(path: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "dstune", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train" and "loss" in r}


def wait_for_step(run: Path, step: int, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= step:
            return
        time.sleep(0.05)
    raise SystemExit(f"the job ended before step {step}:\n{proc.stdout.read()[-3000:]}")


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "dstune" in " ".join(p.cmdline())]


def gone(procs: list[psutil.Process]) -> bool:
    return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs)


def run_case(name: str, inject, out: Path, stage: int, port: int, reference: dict[int, float]) -> dict:
    path = recipe(out, name, stage)
    run = out / name
    proc = start(path, port)
    wait_for_step(run, FAULT_AT, proc)
    ranks = ranks_of(proc)
    t0 = time.monotonic()
    inject(proc, ranks)
    launcher_s = ranks_s = None
    while time.monotonic() - t0 < 300 and (launcher_s is None or ranks_s is None):
        if launcher_s is None and proc.poll() is not None:
            launcher_s = time.monotonic() - t0
        if ranks_s is None and gone(ranks):
            ranks_s = time.monotonic() - t0
        time.sleep(0.05)
    for p in ranks:  # a stopped rank that outlived everything
        if p.is_running():
            p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    rerun = start(path, port + 1)
    log, _ = rerun.communicate(timeout=600)
    resumed = next((int(line.split("(step ")[1].rstrip(")")) for line in log.splitlines()
                    if "resumed from" in line), 0)
    got = losses(run)
    diff = max(abs(got[s] - reference[s]) for s in range(resumed + 1, STEPS + 1))
    return {"case": name, "exit": proc.returncode, "launcher_s": launcher_s, "ranks_s": ranks_s,
            "resumed_from": resumed, "rerun_exit": rerun.returncode, "max_loss_diff": diff}


CASES = {
    "kill -9 of rank 1": lambda proc, ranks: ranks[1].kill(),
    "SIGSTOP of rank 1 (hung)": lambda proc, ranks: ranks[1].suspend(),
    "kill -9 of the launcher": lambda proc, ranks: os.kill(proc.pid, signal.SIGKILL),
    "Ctrl-C (SIGINT to the job)": lambda proc, ranks: os.killpg(proc.pid, signal.SIGINT),
    "SIGTERM to the launcher": lambda proc, ranks: os.kill(proc.pid, signal.SIGTERM),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dstune-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    ref = start(recipe(out, "reference", args.stage), 29711)
    log, _ = ref.communicate(timeout=600)
    if ref.returncode != 0:
        raise SystemExit(log[-3000:])
    reference = losses(out / "reference")
    rows = []
    for i, (name, inject) in enumerate(CASES.items()):
        rows.append(run_case(name.split(" (")[0].replace(" ", "_").replace("-", ""), inject, out, args.stage,
                             29720 + 2 * i, reference) | {"case": name})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n2 CPU ranks, ZeRO-{args.stage}, dist_timeout_s {TIMEOUT_S}, fault at step {FAULT_AT} of {STEPS}, "
          f"checkpoint every {EVERY}\n")
    print("| fault | job exit code | launcher exits after | last rank gone after | rerun resumes from | "
          "max loss difference after resume |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        def sec(x):
            return "—" if x is None else f"{x:.1f} s"
        print(f"| {r['case']} | {r['exit']} | {sec(r['launcher_s'])} | {sec(r['ranks_s'])} | "
              f"step {r['resumed_from']} | {r['max_loss_diff']:.1e} |")


if __name__ == "__main__":
    main()
