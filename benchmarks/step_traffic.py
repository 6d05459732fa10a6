"""What one training step computes and moves, per tuning method: FLOPs, bytes and a roofline time.

    python benchmarks/step_traffic.py [RECIPE] [--methods full,lora,prompt,prefix] [--top 12] [key=value ...]

Runs one forward + backward of the recipe's model (default recipes/bench_llama_1b.yaml, the peer's 1.1B
Llama shape) on fake tensors, as `dstune estimate` does: no GPU, no weights, a few seconds per method.
Every aten operator that makes a tensor is counted once (`dstune/planning/traffic.py`): its FLOPs and
the bytes it reads and writes. Its roofline time is max(FLOPs / peak, bytes / bandwidth), by default the
measured ceilings of one H100 (800 TFLOP/s bf16 matmul, 3 TB/s copy). The sum is a floor for the eager
step with no fusion: kernels that reach neither ceiling, launch gaps, the optimizer and DeepSpeed's
bookkeeping come on top. It shows where a method's time must go and what a change saves (bytes are exact
for the code traced; CUDA-only branches, such as the fused RMSNorm, are traced as their CPU code). Prints
a table per method and the top operators.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dstune.methods import bench_presets
from dstune.planning.report import rows_table
from dstune.planning.traffic import recipe_traffic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(Path(__file__).parents[1] / "recipes/bench_llama_1b.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--methods", default="full,lora,prompt,prefix", help=f"of {', '.join(bench_presets())}")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="matmul ceiling (TFLOP/s)")
    parser.add_argument("--bandwidth", type=float, default=3.0, help="memory ceiling (TB/s)")
    parser.add_argument("--top", type=int, default=12, help="operators to list per method")
    args = parser.parse_args()
    roof = lambda flops, nbytes: max(flops / (args.peak_tflops * 1e12), nbytes / (args.bandwidth * 1e12))  # noqa: E731
    summary, tops = [], []
    for method in args.methods.split(","):
        rows = recipe_traffic(Path(args.recipe), bench_presets()[method], args.overrides).rows
        line = {"method": method}
        for phase, short in (("forward", "fwd"), ("backward", "bwd")):
            mine = [r for (p, _), r in rows.items() if p == phase]
            line[f"{short} calls"] = sum(r[2] for r in mine)
            line[f"{short} TFLOP"] = sum(r[0] for r in mine) / 1e12
            line[f"{short} GB"] = sum(r[1] for r in mine) / 1e9
            line[f"{short} roofline ms"] = sum(roof(r[0], r[1]) for r in mine) * 1e3
        line["roofline ms"] = line["fwd roofline ms"] + line["bwd roofline ms"]
        summary.append(line)
        ranked = sorted(rows.items(), key=lambda kv: -roof(kv[1][0], kv[1][1]))[:args.top]
        tops += [{"method": method, "phase": p, "operator": op, "calls": r[2], "TFLOP": r[0] / 1e12,
                  "GB": r[1] / 1e9, "roofline ms": roof(r[0], r[1]) * 1e3} for (p, op), r in ranked]
    print(f"## one step of {Path(args.recipe).name} on fake tensors "
          f"(roofline: {args.peak_tflops:g} TFLOP/s, {args.bandwidth:g} TB/s)\n")
    print(table(summary))
    print(f"\n## top {args.top} operators by roofline time, per method\n")
    print(table(tops))
    return 0


def table(rows: list[dict]) -> str:
    return rows_table(rows, lambda x: f"{x:,.2f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int)
                      else str(x))


if __name__ == "__main__":
    sys.exit(main())
