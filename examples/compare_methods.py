"""Every tuning method on the demo task, same budget: all-MiniLM-L6-v2, 1,200 Rotten Tomatoes reviews,
2 epochs, held-out accuracy on 400. Prints a markdown table (the one in the README).

Usage: python examples/compare_methods.py [--only full,lora,...] [--epochs 2]
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
from demo import REPO, demo_inputs  # noqa: E402

# table label → (run dir name, methods, learning rate): PEFT methods want larger steps than full fine-tuning
METHODS = {
    "full": ("full", [{"name": "full"}], 1e-4),
    "freeze (bottom 3 of 6 layers)": ("freeze", [{"name": "freeze", "layers": 3}], 1e-4),
    "full + layerwise_lr (decay 0.8)": ("layerwise", [{"name": "full"}, {"name": "layerwise_lr", "decay": 0.8}], 1e-4),
    "bitfit": ("bitfit", [{"name": "bitfit"}], 1e-2),
    "lora (r 8, all-linear)": ("lora", [{"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}], 1e-3),
    "lora + DoRA (use_dora)": ("dora", [{"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear",
                                          "use_dora": True}], 1e-3),
    "lora + rsLoRA (use_rslora)": ("rslora", [{"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear",
                                              "use_rslora": True}], 1e-3),
    "lora + LoRA+ (loraplus_lr_ratio 16)": ("loraplus", [{"name": "lora", "r": 8, "alpha": 16,
                                                          "target_modules": "all-linear", "loraplus_lr_ratio": 16}], 1e-3),
    "lora + LoRA+ (loraplus_lr_ratio 16), lower lr": ("loraplus-low", [{"name": "lora", "r": 8, "alpha": 16,
                                                                     "target_modules": "all-linear",
                                                                     "loraplus_lr_ratio": 16}], 2.5e-4),
    "ia3": ("ia3", [{"name": "ia3"}], 1e-2),
    "adapter (houlsby, bottleneck 64)": ("adapter", [{"name": "adapter", "bottleneck": 64}], 1e-3),
    "prompt (20 virtual tokens, after [CLS], from vocabulary tokens)": (
        "prompt", [{"name": "prompt", "num_virtual_tokens": 20}], 3e-1),
    "prefix (20 virtual tokens, gated)": (
        "prefix", [{"name": "prefix", "num_virtual_tokens": 20}], 3e-2),
    "prefix (20 virtual tokens, ungated: PEFT's form)": (
        "prefix-ungated", [{"name": "prefix", "num_virtual_tokens": 20, "gate": False}], 3e-2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only these run-dir names (comma-separated); the table shows all finished runs")
    ap.add_argument("--epochs", type=float, default=2.0)
    a = ap.parse_args()
    out = REPO / "runs" / "compare"
    data, model = demo_inputs(out)
    only = set(a.only.split(",")) if a.only else None
    for label, (name, methods, lr) in METHODS.items():
        if only is not None and name not in only:
            continue
        run, t0 = out / name, time.time()
        cmd = [sys.executable, "-m", "dstune", "train", str(REPO / "recipes" / "classification_minilm.yaml"),
               f"model.path={model}", f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}",
               f"output_dir={run}", f"training.lr={lr}", f"training.epochs={a.epochs}", "training.resume=false",
               f"methods={json.dumps(methods)}"]
        res = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{label} failed:\n{res.stderr[-3000:]}")
        (run / "wall_s.txt").write_text(f"{time.time() - t0:.0f}")
        print(f"{label}: {json.loads((run / 'results.json').read_text())['after']['accuracy']:.3f}",
              file=sys.stderr, flush=True)
    print("| method | trainable params | share | lr | accuracy before | accuracy after | macro-F1 after | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, (name, _, lr) in METHODS.items():
        run = out / name
        if not (run / "results.json").exists():
            continue
        r, info = json.loads((run / "results.json").read_text()), json.loads((run / "run.json").read_text())
        wall = (run / "wall_s.txt").read_text() if (run / "wall_s.txt").exists() else "?"
        print(f"| {label} | {info['trainable_params']:,} | {100 * info['trainable_params'] / info['total_params']:.2f}% "
              f"| {lr:g} | {r['before']['accuracy']:.3f} | {r['after']['accuracy']:.3f} | {r['after']['macro_f1']:.3f} "
              f"| {wall} |")


if __name__ == "__main__":
    main()
