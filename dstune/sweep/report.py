"""A finished sweep ranked on held-out rows: a markdown table (sweep.md) and the adapters' eval curves (sweep.png)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from dstune.config import LOWER_IS_BETTER, RunConfig
from dstune.tasks import get_task


def sweep_metric(cfg: RunConfig) -> str:
    """What ranks the settings: early stopping's metric when the recipe watches one, else the task's headline."""
    watch = cfg.evaluation.watched()
    return watch.metric if watch is not None else get_task(cfg.task).headline_metric


def ranked(cfg: RunConfig, results: dict[str, dict]) -> list[tuple[str, dict, float]]:
    """(adapter, its results, its score) best first: the best evaluation's score where the best state was kept
    (keep_best, early stopping), else the last one's."""
    metric = sweep_metric(cfg)
    rows = []
    for name, r in results.items():
        scores = (r.get("best") or {}).get("scores") or r.get("after") or {}
        rows.append((name, r, scores.get(metric, math.nan)))
    watch = cfg.evaluation.watched()
    lower = watch.lower_is_better() if watch is not None else metric in LOWER_IS_BETTER
    return sorted(rows, key=lambda x: (math.isnan(x[2]), x[2] if lower else -x[2]))


def table(cfg: RunConfig, results: dict[str, dict]) -> str:
    """The ranking as markdown: the best marked, each adapter's score, the step it was taken at, its steps
    (and where early stopping ended it), and its run dir."""
    metric = sweep_metric(cfg)
    lines = [f"| rank | adapter | held-out {metric} | at step | steps | run dir |", "|---:|---|---:|---:|---:|---|"]
    for i, (name, r, score) in enumerate(ranked(cfg, results), 1):
        at = (r.get("best") or {}).get("step", r.get("steps"))
        steps = f"{r.get('steps', '?')}" + (" (stopped early)" if "stopped_early" in r else "")
        lines.append(f"| {i}{' (best)' if i == 1 else ''} | {name} | {score:.4f} | {at} | {steps} | "
                     f"adapters/{name} |")
    return "\n".join(lines)


def write_report(cfg: RunConfig, results: dict[str, dict]) -> str:
    """sweep.md and sweep.png in the job's run dir; returns the table."""
    out = Path(cfg.output_dir)
    text = table(cfg, results)
    (out / "sweep.md").write_text(text + "\n")
    _plot(cfg, [name for name, _, _ in ranked(cfg, results)], out / "sweep.png")
    return text


def _plot(cfg: RunConfig, names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep_metric(cfg)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, name in enumerate(names):
        rows = [json.loads(line) for line in (Path(cfg.output_dir) / "adapters" / name / "metrics.jsonl")
                .read_text().splitlines()]
        curve = [(r["step"], r[metric]) for r in rows if r["split"] == "eval" and metric in r]
        if curve:
            ax.plot(*zip(*curve), marker="o", linewidth=2.5 if i == 0 else 1.2,
                    label=f"{name}{' (best)' if i == 0 else ''}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"sweep: {len(names)} settings in one job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
