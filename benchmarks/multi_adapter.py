"""N LoRA adapters in one job against N jobs one after another, on CPU: `dstune bench --adapters` on real data.

    python benchmarks/multi_adapter.py [--n 4,8] [--ranks 2] [--steps 6] [--out DIR]

SmolLM2-135M-Instruct (the demo package's weights), LoRA r 8 on q and v, fp32, ZeRO-2 on `--ranks` CPU ranks,
packed blocks of 64 tokens, 2 blocks per adapter per rank per step; the chatterbot pairs cut into N shares,
one per adapter (distinct data). See `dstune bench --help` for what is measured. Prints markdown.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="4,8")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="runs/bench_multi_adapter")
    a = parser.parse_args()
    from distill_chat import pairs_split, plain_model

    out = Path(a.out).resolve()
    train, _ = pairs_split(out / "data")
    base = plain_model(out / "smollm2")
    overrides = [f"model.path={base}", "model.gguf_file=null", f"data.train={train}", "data.max_length=64",
                 "data.packing=true", "methods=[{name: lora, r: 8, alpha: 16}]", "deepspeed=zero2",
                 "training.precision=fp32", "training.micro_batch_size=2", "training.gradient_accumulation_steps=1",
                 "training.activation_checkpointing=false", "training.lr=2.0e-4"]
    cmd = [sys.executable, "-m", "dstune", "bench", str(REPO / "recipes" / "causal_lm_smollm2.yaml"), *overrides,
           "--adapters", a.n, "--ranks", str(a.ranks), "--steps", str(a.steps), "--out", str(out / "bench")]
    res = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        sys.exit(res.returncode)
    print(f"\nSmolLM2-135M-Instruct, LoRA r 8 (q, v) per adapter, fp32, ZeRO-2, {a.ranks} CPU ranks, {a.steps} steps of "
          "2 packed 64-token blocks per adapter per rank, each adapter on its own share of the chatterbot pairs")


if __name__ == "__main__":
    main()
