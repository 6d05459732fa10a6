"""How long the CLI takes to answer commands that need no model: median wall time of N runs of each, as a
fresh process (what a user waits for). Prints a markdown table.

Usage: python benchmarks/cli_startup.py [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """task: classification
model: {path: /nonexistent/model}
data: {train: /nonexistent/train.jsonl}
training: {lr: 1.0e-4}
output_dir: /tmp/dstune-cli-startup
"""


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    recipe = Path(tempfile.mkdtemp()) / "r.yaml"
    recipe.write_text(RECIPE)
    dstune = [sys.executable, "-m", "dstune"]
    commands = {
        "dstune --help": [*dstune, "--help"],
        "dstune train --help": [*dstune, "train", "--help"],
        "dstune launch --dry-run (torchrun, 2 ranks)": [*dstune, "launch", "--launcher", "torchrun",
                                                        "--procs-per-node", "2", "--dry-run", str(recipe)],
        "dstune train, misspelt key (config error)": [*dstune, "train", str(recipe), "training.lrr=1"],
        "dstune methods": [*dstune, "methods"],
        "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
    }
    print(f"median of {a.runs} runs, seconds, fresh processes\n")
    print("| command | wall (s) |")
    print("|---|---:|")
    for name, cmd in commands.items():
        wall(cmd)  # page cache warm
        print(f"| {name} | {statistics.median(wall(cmd) for _ in range(a.runs)):.2f} |", flush=True)


if __name__ == "__main__":
    main()
