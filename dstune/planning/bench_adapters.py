"""`dstune bench --adapters N`: N adapters in one job against the same N trained as jobs one after another.

Each adapter is the recipe's methods on its own share of the recipe's training rows (row i of every N goes
to adapter i), so the N jobs and the one job train exactly the same things (each adapter's run dir holds
the recipe of its own job, which is what runs as one of the N). Measured per N: wall-clock of the whole
commands (start-up, data, loading, training, saving), the training loop alone (the steps after the first),
the peak RSS or CUDA memory summed over ranks, and the routing overhead: the job's tokens/s against one
adapter trained on as many rows per step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dstune.config import RANDOM_DATA, RunConfig, load_config
from dstune.errors import UserError


def shards(cfg: RunConfig, n: int, out: Path) -> list[str]:
    """The recipe's training file cut into n shares (row i → share i mod n), written as JSON lines."""
    if cfg.data.train == RANDOM_DATA:
        return [RANDOM_DATA] * n
    if not isinstance(cfg.data.train, str):
        raise UserError("bench --adapters: data.train must be one file (each adapter trains on a share of its rows)")
    from dstune.data.files import load_table

    table = load_table(cfg.data.train, "data.train", cfg.data.cache_dir)
    if len(table) < n:
        raise UserError(f"bench --adapters: data.train has {len(table)} rows, fewer than {n} adapters")
    paths = []
    for i in range(n):
        paths.append(str(out / f"share{n}-{i}.jsonl"))
        if not Path(paths[-1]).exists():
            table.shard(num_shards=n, index=i, contiguous=False).to_json(paths[-1], lines=True, force_ascii=False)
    return paths


def _train(args: list[str], ranks: int, run_dir: Path) -> float:
    """`dstune train ARGS` on `ranks` processes into `run_dir` (each run's output kept in run_dir.log); its
    wall-clock seconds."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "dstune"] \
        if ranks > 1 else [sys.executable, "-m", "dstune"]
    started = time.perf_counter()
    _run([*launcher, "train", *args, f"output_dir={run_dir}", "training.resume=false", "training.checkpoint_every=0",
          "logging.report_to=[jsonl]"], run_dir)
    return time.perf_counter() - started


def _run(cmd: list[str], run_dir: Path) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    Path(f"{run_dir}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{res.stdout}--- stderr\n{res.stderr}")
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"bench --adapters: {run_dir.name} failed (exit {res.returncode}): {tail} "
                        f"(whole output: {run_dir}.log)")


def _peak(run_dir: Path) -> int:
    """The largest memory of a training phase, summed over ranks (bytes): the CUDA allocator's peak on a GPU,
    the process RSS on a CPU."""
    ranks = json.loads((run_dir / "memory.json").read_text())["phase_peaks"]
    key = "cuda" if "cuda" in ranks[0] else "rss"
    return sum(max(r[key][p] for p in ("forward", "backward", "step")) for r in ranks)


def _loop(metrics: Path) -> tuple[float, int]:
    """(seconds, steps) of the training steps after the first."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step_s"] for r in rows if r["split"] == "train" and r["step"] > 1 and "step_s" in r]
    return sum(steps), len(steps)


def measure(recipe: str, overrides: list[str], n: int, steps: int, ranks: int, out: Path) -> dict:
    """One N: the job, its N adapters' own jobs one after another, and one adapter on the job's rows."""
    cfg = load_config(recipe, overrides)
    if cfg.adapters:
        raise UserError("bench --adapters: the recipe lists adapters already; the bench makes N of its methods")
    out.mkdir(parents=True, exist_ok=True)
    common = [*overrides, f"training.max_steps={steps}", "data.eval=null", "data.eval_fraction=0",
              "evaluation.every=0"]
    adapters = [{"name": f"a{i}", "data": {"train": path}} for i, path in enumerate(shards(cfg, n, out))]
    job_args = [recipe, *common, f"adapters={json.dumps(adapters)}"]
    _run([sys.executable, "-m", "dstune", "prepare", *job_args], out / f"prepare{n}")  # neither side pays it
    job = out / f"job{n}"
    job_wall = _train(job_args, ranks, job)
    own = [(out / f"alone{n}-{i}", job / "adapters" / f"a{i}" / "config.yaml") for i in range(n)]
    own_wall = sum(_train([str(config)], ranks, run) for run, config in own)
    same = out / f"one-adapter{n}"
    micro = cfg.training.micro_batch_size
    same_wall = _train([str(own[0][1]), f"training.micro_batch_size={micro * n}"], ranks, same)
    job_loop, timed = _loop(job / "adapters" / "a0" / "metrics.jsonl")
    same_loop, _ = _loop(same / "metrics.jsonl")
    own_loops = [_loop(run / "metrics.jsonl")[0] for run, _ in own]
    own_peaks = [_peak(run) for run, _ in own]
    return {"adapters": n, "ranks": ranks, "steps": steps, "job_wall_s": job_wall, "jobs_wall_s": own_wall,
            "one_adapter_wall_s": same_wall, "job_loop_s": job_loop, "jobs_loop_s": sum(own_loops),
            "job_peak_bytes": _peak(job), "jobs_peak_max_bytes": max(own_peaks),
            "jobs_peak_sum_bytes": sum(own_peaks), "routing_ratio": same_loop / job_loop if job_loop else None,
            "timed_steps": timed}


def markdown(rows: list[dict]) -> str:
    """The table: N, wall-clock one job vs N jobs, loop seconds, peak memory against the N jobs' largest and
    sum, and the job's tokens/s over one adapter's on the same rows."""
    gib = 2 ** 30
    lines = ["| adapters | one job: wall s | N jobs one after another: wall s | speed-up | training loop s: job / "
             "N jobs | peak memory GiB: job | N jobs: largest / sum | job / sum | tokens/s: job / 1 adapter "
             "on the same rows |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['adapters']} | {r['job_wall_s']:.0f} | {r['jobs_wall_s']:.0f} | "
                     f"{r['jobs_wall_s'] / r['job_wall_s']:.2f}× | {r['job_loop_s']:.0f} / {r['jobs_loop_s']:.0f} | "
                     f"{r['job_peak_bytes'] / gib:.2f} | {r['jobs_peak_max_bytes'] / gib:.2f} / "
                     f"{r['jobs_peak_sum_bytes'] / gib:.2f} | {r['job_peak_bytes'] / r['jobs_peak_sum_bytes']:.2f} | "
                     f"{r['routing_ratio']:.2f} |")
    return "\n".join(lines)


def bench_adapters(recipe: str, overrides: list[str], counts: list[int], out_dir: str, steps: int,
                   ranks: int) -> list[dict]:
    """Measure each N of `counts`; writes OUT/adapters.md and OUT/adapters.json."""
    if steps < 2:
        raise UserError("bench --adapters: --steps must be at least 2 (the first step is not timed)")
    out = Path(out_dir)
    rows = [measure(recipe, overrides, n, steps, ranks, out) for n in counts]
    (out / "adapters.json").write_text(json.dumps(rows, indent=1))
    (out / "adapters.md").write_text(markdown(rows) + "\n")
    return rows
