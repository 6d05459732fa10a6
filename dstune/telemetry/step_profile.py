"""`training.profile_step`: torch.profiler around one optimizer step, to see where its time goes.

Each rank writes OUTPUT_DIR/profile/trace-rank{R}.json (a Chrome trace: open it in Perfetto or
chrome://tracing); rank 0 also writes profile/profile.md: the step's phases (forward, backward, optimizer
step) and the operators that took the most time, by their own device time on a GPU (kernels launched
by the operator, not by the operators it calls) or their own CPU time elsewhere.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

PHASE_PREFIX = "dstune/"


def _self_device_us(e) -> float:
    return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0


def _device_us(e) -> float:
    return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0


def profile_table(events, top: int = 25) -> str:
    """Markdown: the phases, then the `top` operators by self device time (or self CPU time without one)."""
    ops = [e for e in events if not e.key.startswith(PHASE_PREFIX)
           and getattr(e, "device_type", torch.autograd.DeviceType.CPU) == torch.autograd.DeviceType.CPU]
    on_device = any(_self_device_us(e) > 0 for e in ops)
    cost = _self_device_us if on_device else (lambda e: e.self_cpu_time_total)
    what = "self device time" if on_device else "self CPU time"
    lines = ["| phase | CPU ms | device ms |", "|---|---:|---:|"]
    for e in sorted((e for e in events if e.key.startswith(PHASE_PREFIX)), key=lambda e: e.key):
        device = f"{_device_us(e) / 1e3:.2f}" if on_device else "—"
        lines.append(f"| {e.key[len(PHASE_PREFIX):]} | {e.cpu_time_total / 1e3:.2f} | {device} |")
    total = sum(cost(e) for e in ops) or 1.0
    lines += ["", f"| operator | calls | {what} (ms) | share | input shapes (first) |", "|---|---:|---:|---:|---|"]
    for e in sorted(ops, key=cost, reverse=True)[:top]:
        if cost(e) <= 0:
            break
        shapes = str(e.input_shapes)[:60] if getattr(e, "input_shapes", None) else ""
        lines.append(f"| {e.key} | {e.count} | {cost(e) / 1e3:.2f} | {100 * cost(e) / total:.1f}% | {shapes} |")
    return "\n".join(lines) + "\n"


class StepProfile:
    """Profiles optimizer step `step` (1-based, as metrics.jsonl counts; 0 = never) into `out_dir`."""

    def __init__(self, step: int, out_dir: Path, rank: int, is_main: bool):
        self.step, self.out_dir, self.rank, self.is_main = step, Path(out_dir), rank, is_main
        self.active = False

    @contextlib.contextmanager
    def around(self, step: int) -> Iterator[None]:
        """Wrap one optimizer step; profiles it if it is the chosen one."""
        if step != self.step:
            yield
            return
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities, record_shapes=True) as prof:
            self.active = True
            try:
                yield
            finally:
                self.active = False
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the step's kernels belong to the trace
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / f"trace-rank{self.rank}.json"))
        if self.is_main:
            averages = prof.key_averages(group_by_input_shape=True)
            (self.out_dir / "profile.md").write_text(f"# Step {self.step}, rank 0\n\n{profile_table(averages)}")

    def phase(self, name: str):
        """A named range in the trace (forward, backward, step) while profiling; nothing otherwise."""
        return torch.profiler.record_function(PHASE_PREFIX + name) if self.active else contextlib.nullcontext()
