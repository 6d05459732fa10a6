"""`dstune bench`: each method in its own process on the same recipe; a table, JSON and a plot."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from dstune.config import RunConfig, load_config
from dstune.errors import UserError
from dstune.profiling.estimate import estimate
from dstune.profiling.flops import mfu
from dstune.profiling.report import human_bytes

# what a method name means on the bench command line (the peer baseline's settings)
BENCH_METHODS = {
    "full": [{"name": "full"}],
    "freeze": [{"name": "freeze", "layers": 1}],
    "bitfit": [{"name": "bitfit"}],
    "lora": [{"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}],
    "ia3": [{"name": "ia3"}],
    "adapter": [{"name": "adapter"}],
    "prompt": [{"name": "prompt", "num_virtual_tokens": 32}],
    "prefix": [{"name": "prefix", "num_virtual_tokens": 32}],
}
WARMUP_STEPS = 2  # first steps include allocator growth and lazy init: left out of the medians


def _run_one(recipe: str, overrides: list[str], method: str, out: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "dstune", "train", recipe, *overrides, f"methods={json.dumps(BENCH_METHODS[method])}",
           f"training.max_steps={steps}", "training.resume=false", "training.checkpoint_every=0",
           "data.eval=null", "data.eval_fraction=0", f"output_dir={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"bench: method {method} failed: {tail}")


def _row(cfg: RunConfig, method: str, run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"][WARMUP_STEPS:] or [x for x in lines if x["split"] == "train"]
    step_s = statistics.median(x["step_s"] for x in train)
    tokens_per_s = statistics.median(x["tokens_per_s"] for x in train)
    recorded = json.loads((run / "memory.json").read_text())
    memory, phases = recorded["after_first_step"][0], recorded["phase_peaks"][0]
    cuda = "allocator_peak" in phases
    # peak over the whole run: the allocator's on a GPU, the process's peak RSS on CPU
    peak = max(phases["allocator_peak"].values()) if cuda else phases["peak_rss"]
    est_cfg = cfg.model_copy(update={"methods": BENCH_METHODS[method]})
    (est, *_), _, info_est = estimate(est_cfg, info["world_size"], cuda=cuda)
    return {"method": method, "trainable_params": info["trainable_params"], "tokens_per_s": tokens_per_s,
            "step_s": step_s, "mfu": mfu(tokens_per_s, info_est["flops_per_token"], info["world_size"]), "peak_bytes": peak,
            "peak_source": "cuda allocator" if cuda else "peak RSS",
            "device_peak_bytes": max(phases["device_peak"].values()) if cuda and phases["device_peak"] else None,
            "phase_peaks": phases,
            "estimate_bytes": est.total, "estimate": est.as_dict(),
            "model_state_bytes_measured": memory["weights"] + memory["gradients"] + memory["optimizer_states"]}


def bench(recipe: str, overrides: list[str], methods: list[str], out_dir: str, steps: int) -> list[dict]:
    """Run every method, then write bench.md, bench.json and bench.png to out_dir."""
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(BENCH_METHODS)}")
    if steps <= WARMUP_STEPS:
        raise UserError(f"--steps: must be more than the {WARMUP_STEPS} warm-up steps")
    cfg = load_config(recipe, overrides)
    out = Path(out_dir)
    rows = []
    for method in tqdm(methods, desc="bench", unit="method"):
        _run_one(recipe, overrides, method, out / method, steps)
        rows.append(_row(cfg, method, out / method))
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    (out / "bench.md").write_text(markdown(rows))
    plot(rows, out / "bench.png")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | trainable params | step (s) | tokens/s | MFU | peak memory | estimate | model states measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {m} "
                     f"| {human_bytes(r['peak_bytes'])} ({r['peak_source']}) | {human_bytes(r['estimate_bytes'])} "
                     f"| {human_bytes(r['model_state_bytes_measured'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Estimated memory by part, stacked per method, with the measured peak marked; tokens/s beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["weights", "gradients", "optimizer_states", "activations", "buffers"]
    names = [r["method"] for r in rows]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [r["estimate"][part] / 2**20 for r in rows]
        mem.bar(names, values, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    mem.scatter(names, [r["peak_bytes"] / 2**20 for r in rows], color="black", marker="_", s=600, zorder=3,
                label=f"measured peak ({rows[0]['peak_source']})")
    mem.scatter(names, [r["model_state_bytes_measured"] / 2**20 for r in rows], color="tab:red", marker="x", zorder=3,
                label="measured model states (engine tensors)")
    mem.set_yscale("symlog")  # a CPU process's RSS dwarfs a tiny model; keep both visible
    mem.set_ylabel("MiB per rank")
    mem.set_title("memory: estimate by part vs measured")
    mem.legend(fontsize=8)
    speed.bar(names, [r["tokens_per_s"] for r in rows], color="tab:gray")
    speed.set_ylabel("tokens / s")
    speed.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
