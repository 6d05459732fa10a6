"""Memory of a quantized base, measured on CPU beside `dstune estimate`: full precision against nf4 and int8.

    python benchmarks/quantized_memory.py [--models NAME,NAME] [--bases full,nf4,int8] [--out DIR]

LoRA (r 16, every linear layer) trains 2 steps on SmolLM2-135M-Instruct (the demo package's weights) and on
the TinyLlama-1.1B shape (random weights, random tokens), fp32, sequence 128, micro-batch 1: 1 rank under ZeRO-0
and 2 ranks under ZeRO-3. Per rank: the weights held after the first step (memory.json: parameters or their
ZeRO-3 partitions, plus the quantization constants) beside the estimate's weights, and the process's RSS while
it trains (the largest at the end of a forward, backward or step; loading is left out: it reads the weights
file through a memory map) beside the estimate's peak, which leaves out the Python process itself (torch,
DeepSpeed and transformers imported: about 0.5 GiB). A finished run dir is read again. Prints markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

LORA = '[{name: lora, r: 16, alpha: 32, target_modules: all-linear}]'
COMMON = ["training.precision=fp32", "training.max_steps=2", "training.micro_batch_size=1", "data.max_length=128",
          "training.checkpoint_every=0", "training.save_final=false", "training.activation_checkpointing=false",
          "data.eval_fraction=0", "data.eval=null", f"methods={LORA}", "logging.report_to=[jsonl]",
          "training.resume=false", "evaluation.every=0", "evaluation.generate=false",
          "training.gradient_accumulation_steps=1"]


def models(out: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (recipe, overrides) of each model measured."""
    from distill_chat import pairs_split, plain_model

    train, _ = pairs_split(out / "data")
    smollm2 = plain_model(out / "smollm2")
    return {"SmolLM2-135M-Instruct": (str(REPO / "recipes" / "causal_lm_smollm2.yaml"),
                                      [f"model.path={smollm2}", "model.gguf_file=null", f"data.train={train}"]),
            "TinyLlama-1.1B shape": (str(REPO / "recipes" / "bench_llama_1b.yaml"), ["training.lr_schedule=linear"])}


def run(recipe: str, overrides: list[str], run_dir: Path, ranks: int) -> dict:
    """Train (unless `run_dir` holds a finished run), then read memory.json: weights and RSS per rank."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "dstune"] \
        if ranks > 1 else [sys.executable, "-m", "dstune"]
    cmd = [*launcher, "train", recipe, *overrides, f"output_dir={run_dir}"]
    if not (run_dir / "memory.json").exists():
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode != 0:
            sys.exit(f"{run_dir.name} failed:\n{res.stderr[-3000:]}")
    memory = json.loads((run_dir / "memory.json").read_text())
    return {"weights": [r["weights"] for r in memory["after_first_step"]],
            "rss": [max(r["rss"][p] for p in ("forward", "backward", "step")) for r in memory["phase_peaks"]]}


def estimated(recipe: str, overrides: list[str], ranks: int) -> dict:
    from dstune.config import load_config
    from dstune.planning.estimate import estimate

    per_rank, _, _ = estimate(load_config(recipe, overrides), ranks, cuda=False)
    return {"weights": per_rank[0].weights, "total": per_rank[0].total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "quantized_memory"))
    ap.add_argument("--bases", default="full,nf4,int8")
    ap.add_argument("--models", default="SmolLM2-135M-Instruct,TinyLlama-1.1B shape")
    a = ap.parse_args()
    from dstune.planning.report import human_bytes as gib

    out = Path(a.out)
    print("| model | base | ranks, ZeRO | weights per rank, measured | estimate | RSS per rank, training | peak "
          "estimate (without the process) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, (recipe, extra) in models(out / "inputs").items():
        if name not in a.models.split(","):
            continue
        for base in a.bases.split(","):
            for ranks, stage in ((1, 0), (2, 3)):
                overrides = [*extra, *COMMON, f"deepspeed=zero{stage}",
                             f"model.quantize={'null' if base == 'full' else base}"]
                tag = f"{name.split()[0].lower()}-{base}-{ranks}r"
                m, e = run(recipe, overrides, out / tag, ranks), estimated(recipe, overrides, ranks)
                print(f"| {name} | {'full precision (fp32)' if base == 'full' else base} | {ranks}, ZeRO-{stage} | "
                      f"{gib(max(m['weights']))} | {gib(e['weights'])} | {gib(max(m['rss']))} | "
                      f"{gib(e['total'])} |", flush=True)


if __name__ == "__main__":
    main()
