"""Knowledge distillation on the demo task: all-MiniLM-L6-v2 fully fine-tuned on 1,200 Rotten Tomatoes
reviews is the teacher; a 3-layer student initialised from its bottom layers trains on the same reviews
with and without the teacher, and with the teacher and --unlabeled more reviews whose labels it never
sees (data.unlabeled: the teacher's outputs alone train on them). Held-out accuracy on 400 reviews, per
seed and mean. Prints a markdown table (the one in the README).

Usage: python examples/distill.py [--seeds 1,2,3] [--epochs 2] [--student-lr 5e-4] [--alpha 0.5]
                                  [--temperature 2] [--unlabeled 4000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO, demo_inputs, write_pool  # noqa: E402

RECIPE = REPO / "recipes" / "classification_minilm.yaml"


def train(run: Path, overrides: list[str]) -> dict:
    """Train unless `run` already finished; its results.json."""
    if not (run / "results.json").exists() or "after" not in json.loads((run / "results.json").read_text()):
        cmd = [sys.executable, "-m", "dstune", "train", str(RECIPE), f"output_dir={run}", "training.resume=false",
               *overrides]
        res = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{run.name} failed:\n{res.stderr[-3000:]}")
    return json.loads((run / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--student-lr", type=float, default=5e-4, help="a 3-layer student wants larger steps")
    ap.add_argument("--unlabeled", type=int, default=4000, help="reviews without labels (0: leave that row out)")
    a = ap.parse_args()
    out = REPO / "runs" / "distill"
    data, model = demo_inputs(out)
    common = [f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}",
              f"training.epochs={a.epochs}", 'methods=[{name: full}]', "training.lr=1e-4"]
    teacher = train(out / "teacher", common)
    print(f"teacher (6 layers): {teacher['after']['accuracy']:.3f}", file=sys.stderr, flush=True)
    student = [*common, "model.config_overrides={num_hidden_layers: 3}", f"training.lr={a.student_lr}"]
    kd = [f"distill={{teacher: {out / 'teacher'}, alpha: {a.alpha}, temperature: {a.temperature}}}"]
    variants = {"student alone": ("plain", []),
                f"student + distillation (alpha {a.alpha:g}, T {a.temperature:g})": ("kd", kd)}
    if a.unlabeled:
        pool = write_pool(data, a.unlabeled)
        variants[f"student + distillation + {a.unlabeled:,} unlabelled reviews"] = (
            f"kd-pool{a.unlabeled}", [*kd, f"data.unlabeled={pool}"])
    rows: dict[str, list[float]] = {label: [] for label in variants}
    for seed in a.seeds.split(","):
        for label, (tag, extra) in variants.items():
            name = f"student-{tag}-lr{a.student_lr:g}-seed{seed}"
            acc = train(out / name, [*student, *extra, f"training.seed={seed}"])["after"]["accuracy"]
            rows[label].append(acc)
            print(f"{name}: {acc:.3f}", file=sys.stderr, flush=True)
    info = json.loads(next(out.glob("student-plain-*/run.json")).read_text())
    print(f"all-MiniLM-L6-v2 on Rotten Tomatoes, 1,200 labelled / 400 held-out reviews, {a.epochs:g} epochs, full "
          f"fine-tuning (teacher lr 1e-4, student lr {a.student_lr:g}); student: the bottom 3 of its 6 layers "
          f"({info['total_params']:,} parameters)\n")
    print("| model | seeds | held-out accuracy (each) | mean |")
    print("|---|---:|---|---:|")
    print(f"| teacher (6 layers) | 1 | {teacher['after']['accuracy']:.3f} | {teacher['after']['accuracy']:.3f} |")
    for label, accs in rows.items():
        print(f"| {label} | {len(accs)} | {', '.join(f'{x:.3f}' for x in accs)} | {statistics.mean(accs):.3f} |")


if __name__ == "__main__":
    main()
