"""LoRA on a quantized base against a full-precision one (QLoRA's claim: a 4-bit NormalFloat base recovers
16-bit LoRA quality): SmolLM2-135M-Instruct on the chatterbot prompt/reply pairs (split by prompt as in
examples/distill_chat.py), the same LoRA, steps, learning rate and seeds on the full-precision base and on
nf4, fp4 and int8 bases. Held-out loss over the reply tokens before (the quantized base alone) and after
training, and how far the logits move when the trained adapter is put on the full-precision base instead
(`dstune export --format peft` measures it). Prints markdown (docs/results/quantized-base.md).

Usage: python examples/quantized_chat.py [--steps 60] [--seeds 1,2] [--bases full,nf4,fp4,int8] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO  # noqa: E402
from distill_chat import chat_overrides, pairs_split, plain_model, train  # noqa: E402

LORA = [{"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}]


def logit_shift(run: Path) -> float | None:
    """max |Δ logit| between the run and its adapter on the full-precision base (from the peft export)."""
    out = run.parent / f"{run.name}-peft"
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-m", "dstune", "export", str(run), "--format", "peft", "--out", str(out)],
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"export {run.name} failed:\n{res.stderr[-2000:]}")
    found = re.search(r"moves them by up to ([0-9.e+-]+)", res.stdout)
    return float(found.group(1)) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--bases", default="full,nf4,fp4,int8")
    ap.add_argument("--out", default=str(REPO / "runs" / "quantized_chat"), help="run dirs (finished ones are reused)")
    a = ap.parse_args()
    out = Path(a.out)
    data = REPO / "runs" / "distill_chat"
    train_file, held = pairs_split(data / "data")
    base = plain_model(data / "smollm2")
    common = [*chat_overrides(base, train_file, held), f"training.max_steps={a.steps}", "training.warmup_steps=5",
              "training.lr=1e-3", f"methods={json.dumps(LORA)}"]
    rows = []
    for name in a.bases.split(","):
        quantize = "null" if name == "full" else name
        before, after, shifts = None, [], []
        for seed in a.seeds.split(","):
            run = out / f"{name}-seed{seed}"
            result = train(run, [*common, f"model.quantize={quantize}", f"training.seed={seed}"])
            before = result["before"]["loss"]  # LoRA starts at zero: the base as quantized, untouched
            after.append(result["after"]["loss"])
            if name != "full":
                shifts.append(logit_shift(run))
            print(f"{run.name}: {before:.4f} -> {after[-1]:.4f}", file=sys.stderr, flush=True)
        rows.append((name, before, after, shifts))
    info = json.loads((out / f"full-seed{a.seeds.split(',')[0]}" / "run.json").read_text())
    print(f"SmolLM2-135M-Instruct on {len(train_file.read_text().splitlines()):,} chatterbot prompt/reply pairs, "
          f"LoRA r 8 on every linear layer ({info['trainable_params']:,} parameters), {a.steps} steps of 8 at lr "
          f"1e-3, fp32 compute; held-out: {len(held.read_text().splitlines()):,} pairs whose prompts were never "
          "trained on (loss over reply tokens).\n")
    print("| base | held-out loss, untouched | after training (each seed) | mean | perplexity | "
          "adapter on the full-precision base: max \\|Δ logit\\| |")
    print("|---|---:|---|---:|---:|---:|")
    for name, before, after, shifts in rows:
        m = statistics.mean(after)
        shift = f"{max(shifts):.2f}" if shifts else "-"
        print(f"| {'full precision' if name == 'full' else name} | {before:.4f} | "
              f"{', '.join(f'{x:.4f}' for x in after)} | {m:.4f} | {math.exp(m):.2f} | {shift} |")


if __name__ == "__main__":
    main()
