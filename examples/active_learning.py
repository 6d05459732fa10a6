"""Active learning on the demo task: all-MiniLM-L6-v2 + LoRA, a pool of 3,000 labelled Rotten Tomatoes
reviews (their labels are the oracle), 100 labelled to start and 5 rounds of 100, entropy vs margin vs
random, 3 seeds; held-out accuracy on the demo's 400 test reviews. Writes runs/active/curve.{json,md,png}
(the README's table and plot) through `dstune active-learn`, which resumes if interrupted.

Usage: python examples/active_learning.py [--seeds 1,2,3] [--strategies entropy,margin,random] [--pool 3000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import N_TEST, N_TRAIN, REPO, demo_inputs, reviews  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--strategies", default="entropy,margin,random")
    ap.add_argument("--pool", type=int, default=3000, help="labelled reviews to draw from")
    a = ap.parse_args()
    out = REPO / "runs" / "active"
    data, model = demo_inputs(out)
    pool = data / "labelled_pool.jsonl"
    part = reviews()[N_TRAIN + N_TEST:N_TRAIN + N_TEST + a.pool]
    pool.write_text("".join(json.dumps(r) + "\n" for r in part.to_dict("records")))
    cmd = [sys.executable, "-m", "dstune", "active-learn", str(REPO / "recipes" / "classification_minilm.yaml"),
           f"model.path={model}", f"data.eval={data / 'test.jsonl'}", "training.epochs=3",
           "--pool", str(pool), "--initial", "100", "--rounds", "5", "--per-round", "100",
           "--strategies", a.strategies, "--seeds", a.seeds, "--out", str(out)]
    sys.exit(subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode)


if __name__ == "__main__":
    main()
