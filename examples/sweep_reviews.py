"""A learning-rate × rank sweep of all-MiniLM-L6-v2 on Rotten Tomatoes reviews: one `dstune sweep` job against
the same settings trained as runs of their own, then the sweep again with early stopping.

    python examples/sweep_reviews.py [--out DIR] [--lr 1e-4,1e-3,1e-2] [--r 4,16] [--epochs 2] [--stop-epochs 4]

The demo's data (1,200 training reviews, 400 held out) and recipe (LoRA on every linear layer, fp32, one
CPU rank). Prints: each setting's held-out accuracy from the sweep and from its own run (the same numbers:
each adapter of a job trains exactly as its own run; MiniLM draws dropout, so each adapter runs forwards of
its own here), the wall-clock of the sweep against the runs one after another, and, with early stopping
(patience 2, evaluated every 15 steps), the steps each setting trained and its best against its last score.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO, demo_inputs  # noqa: E402

RECIPE = REPO / "recipes" / "classification_minilm.yaml"


def dstune(*args: str) -> float:
    """Run `dstune ARGS`; its wall-clock seconds."""
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dstune", *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        sys.exit(f"dstune {' '.join(args[:2])} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - started


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sweep_reviews")
    parser.add_argument("--lr", default="1e-4,1e-3,1e-2")
    parser.add_argument("--r", default="4,16")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--stop-epochs", default="4", help="the epochs planned for the early-stopping sweep")
    a = parser.parse_args()
    out = Path(a.out).resolve()
    data, model = demo_inputs(out)
    common = [f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}",
              f"training.epochs={a.epochs}", "training.resume=false", "evaluation.every=15"]
    grid = ["--grid", f"training.lr={a.lr}", f"methods[0].r={a.r}"]

    sweep = out / "sweep"
    sweep_s = dstune("sweep", str(RECIPE), *common, f"output_dir={sweep}", *grid)
    names = sorted(p.name for p in (sweep / "adapters").iterdir())
    alone_s = 0.0
    for name in names:
        alone_s += dstune("train", str(sweep / "adapters" / name / "config.yaml"), f"output_dir={out / 'alone' / name}",
                          "training.resume=false")
    print(f"all-MiniLM-L6-v2, LoRA (all linear layers), Rotten Tomatoes: 1,200 training reviews, 400 held out, "
          f"{a.epochs} epochs, fp32, one CPU rank\n")
    print("| setting | held-out accuracy: sweep | its own run | |Δ| |")
    print("|---|---:|---:|---:|")
    for name in names:
        mine, own = results(sweep / "adapters" / name)["after"], results(out / "alone" / name)["after"]
        print(f"| {name} | {mine['accuracy']:.4f} | {own['accuracy']:.4f} | "
              f"{abs(mine['loss'] - own['loss']):.1e} (loss) |")
    print(f"\nwall-clock: the sweep {sweep_s:.0f} s, its {len(names)} settings as runs one after another "
          f"{alone_s:.0f} s ({alone_s / sweep_s:.2f}×)\n")

    stopping = out / "sweep_early_stopping"
    stop_s = dstune("sweep", str(RECIPE), *common, f"output_dir={stopping}", f"training.epochs={a.stop_epochs}",
                    "evaluation.early_stopping={metric: accuracy, patience: 2}", *grid)
    print(f"with early stopping (accuracy, patience 2, every 15 steps), {a.stop_epochs} epochs planned: {stop_s:.0f} s")
    print("| setting | steps trained / planned | best accuracy (step) | last accuracy |")
    print("|---|---:|---:|---:|")
    for name in names:
        r = results(stopping / "adapters" / name)
        planned = json.loads((stopping / "adapters" / name / "run.json").read_text())
        best = r.get("best") or {}
        print(f"| {name} | {r['steps']} / {planned.get('planned_steps', '?')} | "
              f"{best.get('scores', {}).get('accuracy', float('nan')):.4f} ({best.get('step')}) | "
              f"{r['after']['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
