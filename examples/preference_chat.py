"""Preference tuning on dialogue: SmolLM2-135M-Instruct and the chatterbot prompt/reply pairs made preference
pairs (chosen: the corpus's reply; rejected: the reply to another prompt, drawn once), split by prompt so
no held-out prompt is trained on. LoRA runs at the same budget: DPO from the base model, SFT on the
chosen replies alone, SFT -> DPO (DPO whose model.path is the SFT run dir: its merged weights, and its
reference), and SFT -> DPO with the chosen replies' NLL added (preference.sft_weight, RPO). Held-out: DPO's reward accuracy and margin before and after, the chosen replies' loss, and how
often each model's greedy reply is closer (ROUGE-L F1) to the chosen reply than to the rejected one; and
what one rank holds with each reference (base stepped aside, a copy, precomputed). Prints markdown
(docs/results/preference.md).

Usage: python examples/preference_chat.py [--steps 60] [--sft-steps 60] [--prompts 100] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO  # noqa: E402
from distill_chat import pairs_split, plain_model  # noqa: E402
from prefix_chat import replies  # noqa: E402

LORA = [{"name": "lora", "r": 16, "alpha": 32}]


def preference_pairs(pairs: Path, out: Path, seed: int = 0) -> Path:
    """Each {prompt, response} row as {prompt, chosen: its reply, rejected: the reply of another row whose
    prompt differs}, drawn once with `seed`."""
    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    out_rows = []
    for row in rows:
        other = rng.choice(rows)
        while other["prompt"] == row["prompt"] or other["response"] == row["response"]:
            other = rng.choice(rows)
        out_rows.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": other["response"]})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    return out


def train(run: Path, recipe: dict) -> dict:
    """Train unless `run` already finished; its results.json."""
    done = run / "results.json"
    if not (done.exists() and "steps" in json.loads(done.read_text())):
        path = run.with_suffix(".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**recipe, "output_dir": str(run)}))
        res = subprocess.run([sys.executable, "-m", "dstune", "train", str(path)], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode != 0:
            sys.exit(f"{run.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(done.read_text())


def closer_to_chosen(said: list[str], pairs: list[dict]) -> tuple[float, float]:
    """(share of replies closer to the chosen reply than to the rejected one, share closer to the rejected)
    by ROUGE-L F1; the rest are ties."""
    from rouge_score import rouge_scorer

    score = rouge_scorer.RougeScorer(["rougeL"]).score
    wins = [score(p["chosen"], s)["rougeL"].fmeasure - score(p["rejected"], s)["rougeL"].fmeasure
            for s, p in zip(said, pairs)]
    return sum(w > 0 for w in wins) / len(wins), sum(w < 0 for w in wins) / len(wins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="DPO optimizer steps")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-4, help="DPO's learning rate (SFT: 1e-3)")
    ap.add_argument("--sft-weight", type=float, default=1.0, help="the NLL term's weight of the last run (RPO)")
    ap.add_argument("--prompts", type=int, default=100, help="held-out prompts whose greedy replies are compared")
    ap.add_argument("--out", default=str(REPO / "runs" / "preference_chat"), help="run dirs (finished ones reused)")
    a = ap.parse_args()
    out = Path(a.out)
    train_pairs, held_pairs = pairs_split(out / "data")
    train_prefs = preference_pairs(train_pairs, out / "data" / "train_prefs.jsonl")
    held_prefs = preference_pairs(held_pairs, out / "data" / "heldout_prefs.jsonl", seed=1)
    base = plain_model(out / "smollm2")
    common = {"model": {"path": str(base)}, "methods": LORA, "deepspeed": "zero0",
              "training": {"precision": "fp32", "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 5, "seed": 1,
                           "checkpoint_every": 0},
              "evaluation": {"batch_size": 16, "generate": False}}
    sft = train(out / "sft", {**common, "task": "causal_lm",
                              "data": {"train": str(train_pairs), "eval": str(held_pairs), "max_length": 128},
                              "training": {**common["training"], "max_steps": a.sft_steps}})
    dpo_recipe = {**common, "task": "preference", "preference": {"loss": "dpo", "beta": a.beta},
                  "data": {"train": str(train_prefs), "eval": str(held_prefs), "max_length": 128},
                  "training": {**common["training"], "max_steps": a.steps, "lr": a.lr}}
    dpo = train(out / "dpo", dpo_recipe)
    sft_dpo = train(out / "sft-dpo", {**dpo_recipe, "model": {"path": str(out / "sft")}})
    sft_rpo = train(out / "sft-rpo", {**dpo_recipe, "model": {"path": str(out / "sft")},
                                      "preference": {"loss": "dpo", "beta": a.beta, "sft_weight": a.sft_weight}})

    held = [json.loads(line) for line in held_prefs.read_text(encoding="utf-8").splitlines()]
    picked = list({p["prompt"]: p for p in held}.values())[:a.prompts]  # one pair per prompt
    closer = {name: closer_to_chosen(replies(out / name, [p["prompt"] for p in picked], 32), picked)
              for name in ("sft", "dpo", "sft-dpo", "sft-rpo")}

    memory = {}  # one short run per reference, LoRA, no held-out rows: what each holds beside the policy
    for ref in ("base", "copy", "precompute"):
        run = out / f"memory-{ref}"
        train(run, {**dpo_recipe, "preference": {"loss": "dpo", "beta": a.beta, "reference": ref},
                    "data": {"train": str(train_prefs), "max_length": 128},
                    "training": {**dpo_recipe["training"], "max_steps": 2}})
        memory[ref] = reference_memory(run)

    n_train = len(train_prefs.read_text(encoding="utf-8").splitlines())
    print(f"SmolLM2-135M-Instruct, LoRA r 16 (q_proj, v_proj), fp32, micro-batch 8, max_length 128, seed 1; "
          f"{n_train:,} training pairs, {len(held):,} held-out pairs (prompts never trained on). DPO: beta "
          f"{a.beta:g}, {a.steps} steps at lr {a.lr:g}; SFT: {a.sft_steps} steps at lr 0.001 on the chosen "
          f"replies. Greedy replies to {len(picked)} held-out prompts (32 new tokens).\n")
    print("| model | held-out reward accuracy | reward margin | chosen-reply loss | greedy reply closer to "
          "chosen / rejected |")
    print("|---|---:|---:|---:|---:|")
    b = dpo["before"]
    print(f"| base model (untouched) | - | - | {b['nll_loss']:.4f} | - |")
    print(f"| SFT alone | - | - | {sft['after']['loss']:.4f} | {closer['sft'][0]:.2f} / {closer['sft'][1]:.2f} |")
    for label, name, r in (("DPO from the base", "dpo", dpo), ("SFT -> DPO", "sft-dpo", sft_dpo),
                           (f"SFT -> DPO + NLL (sft_weight {a.sft_weight:g})", "sft-rpo", sft_rpo)):
        x = r["after"]
        print(f"| {label} | {r['before']['rewards/accuracies']:.2f} -> {x['rewards/accuracies']:.2f} | "
              f"{r['before']['rewards/margins']:.3f} -> {x['rewards/margins']:.3f} | {x['nll_loss']:.4f} | "
              f"{closer[name][0]:.2f} / {closer[name][1]:.2f} |")


    print("\nWhat one rank holds (memory.json), DPO with LoRA and each reference, 2 steps:\n")
    print("| preference.reference | reference weights held | peak process RSS |")
    print("|---|---:|---:|")
    for ref, (held, rss) in memory.items():
        print(f"| {ref} | {held / 2**20:,.0f} MiB | {rss / 2**20:,.0f} MiB |")


def reference_memory(run: Path) -> tuple[int, int]:
    """(the reference weights rank 0 held after the first step, its peak RSS over the run) from memory.json."""
    memory = json.loads((run / "memory.json").read_text())
    return memory["after_first_step"][0].get("reference_bytes", 0), memory["phase_peaks"][0]["peak_rss"]


if __name__ == "__main__":
    main()
