"""Prompt and prefix tuning on dialogue, against the untouched base and LoRA: SmolLM2-135M-Instruct on the
chatterbot prompt/reply pairs (each pair once, split by prompt as in examples/distill_chat.py), every method
at the same step budget. Held-out loss and perplexity over the reply tokens, and the replies each trained
model gives to a few held-out prompts. Prints markdown (the README's table).

Usage: python examples/prefix_chat.py [--steps 60] [--tokens 20] [--replies 3] [--heldout 200] [--out DIR]
                                      [--only prefix-gated-data,lora]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO  # noqa: E402
from distill_chat import chat_overrides, pairs_split, plain_model, train  # noqa: E402

# what a chatbot prefix could say before every message (about 20 tokens)
TASK = "You are a friendly assistant. Reply to the user's message with one short, polite answer."


def variants(tokens: int) -> dict[str, tuple[str, list[dict], float]]:
    """table label → (run name, methods, learning rate)."""
    prefix = {"name": "prefix", "num_virtual_tokens": tokens}
    return {
        "prefix, random, ungated (PEFT's prefix tuning)": ("prefix-random", [{**prefix, "gate": False,
                                                                              "init": "random"}], 1e-2),
        "prefix, from the task text, ungated": ("prefix-text", [{**prefix, "gate": False, "init_text": TASK}], 1e-2),
        "prefix, from the first training prompts, ungated": ("prefix-data", [{**prefix, "gate": False}], 1e-2),
        "prefix, random, gated": ("prefix-gated", [{**prefix, "init": "random"}], 1e-2),
        "prefix, from the task text, gated": ("prefix-gated-text", [{**prefix, "init_text": TASK}], 1e-2),
        "prefix, from the first training prompts, gated (the default)": ("prefix-gated-data", [prefix], 1e-2),
        "prompt, from vocabulary tokens (the default)": ("prompt", [{"name": "prompt", "num_virtual_tokens": tokens}],
                                                          3e-2),
        "lora (r 8, q_proj and v_proj)": ("lora", [{"name": "lora", "r": 8, "alpha": 16}], 1e-3),
    }


def replies(run: Path, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """The run's greedy replies (`dstune generate`), one per prompt."""
    cmd = [sys.executable, "-m", "dstune", "generate", str(run), "--jsonl", "--max-new-tokens", str(max_new_tokens),
           *(arg for p in prompts for arg in ("--prompt", p))]
    res = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"generate {run.name} failed:\n{res.stderr[-2000:]}")
    return [json.loads(line)["reply"] for line in res.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=20, help="virtual tokens of the prompt and prefix")
    ap.add_argument("--replies", type=int, default=3, help="held-out prompts to show replies to")
    ap.add_argument("--heldout", type=int, default=200, help="held-out pairs scored (at most; the split holds 164)")
    ap.add_argument("--out", default=str(REPO / "runs" / "prefix_chat"), help="run dirs (finished ones are reused)")
    ap.add_argument("--only", help="run only these run names (comma-separated): prefix-random, prefix-text, ...")
    a = ap.parse_args()
    names = {name for name, _, _ in variants(a.tokens).values()}
    only = set(a.only.split(",")) if a.only else names
    if only - names:
        sys.exit(f"--only: unknown run name(s) {', '.join(sorted(only - names))}; known: {', '.join(sorted(names))}")
    out = Path(a.out)
    data = REPO / "runs" / "distill_chat"
    train_file, held = pairs_split(data / "data")
    base = plain_model(data / "smollm2")
    common = [*chat_overrides(base, train_file, held), "training.seed=1", f"evaluation.max_samples={a.heldout}",
              f"training.max_steps={a.steps}", "training.warmup_steps=5"]
    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in held.read_text().splitlines()))[:a.replies]
    rows, shown, base_score = [], {}, None
    for label, (name, methods, lr) in variants(a.tokens).items():
        if name not in only:
            continue
        result = train(out / name, [*common, f"methods={json.dumps(methods)}", f"training.lr={lr}"])
        info = json.loads((out / name / "run.json").read_text())
        # the untouched base: scored apart where the method changes the model at step 0, else its step 0
        base_score = result.get("base", result["before"])
        rows.append((label, info["trainable_params"], lr, result["before"], result["after"]))
        shown[label] = replies(out / name, prompts)
        print(f"{name}: {result['before']['loss']:.3f} -> {result['after']['loss']:.3f}", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M-Instruct (fp32) on {len(train_file.read_text().splitlines()):,} chatterbot prompt/reply "
          f"pairs, {a.steps} steps of 8, {a.tokens} virtual tokens; held-out: "
          f"{min(a.heldout, len(held.read_text().splitlines())):,} pairs whose prompts were never trained on "
          f"(loss over reply tokens). The untouched base model: loss {base_score['loss']:.4f}, perplexity "
          f"{base_score['perplexity']:.1f}.\n")
    print("| method | trainable params | lr | held-out loss at step 0 | after | perplexity after | vs base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, params, lr, before, after in rows:
        print(f"| {label} | {params:,} | {lr:g} | {before['loss']:.4f} | {after['loss']:.4f} | "
              f"{after['perplexity']:.1f} | {after['loss'] - base_score['loss']:+.4f} |")
    print("\nReplies to held-out prompts (greedy, 24 new tokens):\n")
    for i, prompt in enumerate(prompts):
        print(f"- **{prompt}**")
        for label, texts in shown.items():
            print(f"  - {label}: {texts[i].strip()!r}" if i < len(texts) else f"  - {label}: (none)")


if __name__ == "__main__":
    main()
