"""Human-readable reports: memory estimates, and markdown tables of result rows."""
from __future__ import annotations

from typing import Any, Callable

from dstune.config import RunConfig


def rows_table(rows: list[dict], fmt: Callable[[Any], str] = str) -> str:
    """A markdown table of result rows (dicts with the same keys), one column per key."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def estimate_table(cfg: RunConfig, est, table, info: dict, world: int, deepspeed_says: int | None) -> str:
    """Markdown table of one rank's estimate, parts and total, with DeepSpeed's own number for contrast."""
    t = cfg.training
    runs = cfg.adapter_runs()
    names = ", ".join(m["name"] for m in cfg.methods) if not cfg.adapters else \
        f"{len(runs)} adapters ({'; '.join(f'{n}: ' + ', '.join(m['name'] for m in r.methods) for n, r in runs)})"
    rows_per_micro = sum(r.training.micro_batch_size for _, r in runs)
    head = (f"{names} — {table.trainable:,} of {table.total:,} parameters train "
            f"({100 * table.trainable / max(table.total, 1):.2f}%); ZeRO-{info['zero_stage']}"
            f"{' + optimizer offload' if info['offload_optimizer'] else ''}"
            f"{' + parameter offload' if info['offload_params'] else ''}, {t.precision}, {world} rank(s), "
            f"micro-batch {rows_per_micro}{' (every adapter’s rows)' if cfg.adapters else ''}, "
            "activation checkpointing "
            f"{'auto (estimated off: on at run time where this does not fit)' if t.activation_checkpointing == 'auto' else 'on' if t.activation_checkpointing else 'off'}")
    rows = [("weights", est.weights), ("gradients", est.gradients), ("optimizer states", est.optimizer_states),
            ("activations (traced forward + backward peak)", est.activations),
            ("buffers (comm buckets, CUDA context)", est.buffers),
            ("optimizer-step temporaries (not alive with the activations)", est.step_temporaries)]
    if cfg.distill:
        rows += [("teacher weights (frozen; ZeRO-3: partitioned)", est.teacher_weights),
                 ("teacher logits (one micro-batch, beside the activations)", est.teacher_activations)]
    if cfg.preference and info.get("reference"):
        rows += [(f"reference model (preference.reference: {info['reference']}"
                  f"{'; frozen, ZeRO-3: partitioned' if est.reference_weights else ': no second model'})",
                  est.reference_weights)]
    rows += [("**peak per rank**", est.total)]
    lines = [head, "", "| part | bytes | |", "|---|---:|---:|"]
    lines += [f"| {name} | {n:,} | {human_bytes(n)} |" for name, n in rows]
    lines += ["", "peak = model states + buffers + the larger of activations and step temporaries"]
    if info["activations_after_forward"] is not None:
        lines[-1] += (f"; the forward leaves {human_bytes(info['activations_after_forward'])} of activations "
                      f"for the backward")
    else:
        lines += ["", f"**activations: {info['activations_source']}**"]
    lines += ["", f"one checkpoint, all ranks: {human_bytes(info['checkpoint_bytes'])} (what trains and its "
                  "optimizer state; the frozen base is reloaded from model.path)"]
    if deepspeed_says is not None:
        lines += ["", f"DeepSpeed's own model-state estimate: {human_bytes(deepspeed_says)} per GPU "
                      f"(it counts all {table.total:,} parameters as trainable); "
                      f"dstune's model states: {human_bytes(est.weights + est.gradients + est.optimizer_states)}"]
    return "\n".join(lines)


GPUS = ((16, "T4, V100"), (24, "L4, A10, RTX 4090"), (40, "A100 40GB"), (48, "L40S, A6000"),
        (80, "A100 80GB, H100"), (141, "H200"))  # GiB of memory a GPU has: the sizes users rent


def base_table(rows: list[tuple[str, int, int]], margin: float) -> str:
    """A quantized base beside the full-precision one: weights and peak per rank, and the smallest GPU size
    each fits in (its peak within `margin` of the GPU's memory, as activation checkpointing `auto` judges)."""
    lines = ["| base | weights per rank | peak per rank | smallest GPU it fits |", "|---|---:|---:|---|"]
    for name, weights, peak in rows:
        fits = next((f"{gib} GiB ({names})" for gib, names in GPUS if peak <= margin * gib * 2**30),
                    f"none of {GPUS[-1][0]} GiB or less")
        lines.append(f"| {name} | {human_bytes(weights)} | {human_bytes(peak)} | {fits} |")
    return "\n".join(lines)
