"""`dstune bench`: each method in its own process on the same recipe; a table, JSON and a plot."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from dstune.config import RunConfig, load_config
from dstune.engine.ds_config import build_ds_config, zero_stage
from dstune.errors import UserError
from dstune.profiling.estimate import estimate
from dstune.profiling.flops import mfu
from dstune.profiling.report import human_bytes

# what a method name means on the bench command line (the peer baseline's settings)
BENCH_METHODS = {
    "full": [{"name": "full"}],
    "freeze": [{"name": "freeze", "layers": 1}],
    "bitfit": [{"name": "bitfit"}],
    "lora": [{"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}],
    "ia3": [{"name": "ia3"}],
    "adapter": [{"name": "adapter"}],
    "prompt": [{"name": "prompt", "num_virtual_tokens": 32}],
    "prefix": [{"name": "prefix", "num_virtual_tokens": 32}],
    "prefix-split": [{"name": "prefix", "num_virtual_tokens": 32, "attention": "split"}],
    "prefix-lower-right": [{"name": "prefix", "num_virtual_tokens": 32, "attention": "lower-right"}],
}
WARMUP_STEPS = 2  # first steps include allocator growth and lazy init: left out of the medians


PEER_METHODS = ("full", "lora", "prefix", "prompt")  # what the peer baseline script can run


def peer_method(method: str) -> str:
    """The peer's name for a bench method: its tuning method's (prefix-split is prefix tuning)."""
    return BENCH_METHODS[method][0]["name"]


def _run_logged(cmd: list[str], log: Path, what: str) -> str:
    """Run one child process, keep its whole output in `log`; its stdout. A failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{res.stdout}--- stderr\n{res.stderr}")
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"bench: {what} failed (exit {res.returncode}): {tail} (whole output: {log})")
    return res.stdout


def _run_one(recipe: str, overrides: list[str], method: str, out: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "dstune", "train", recipe, *overrides, f"methods={json.dumps(BENCH_METHODS[method])}",
           f"training.max_steps={steps}", "training.resume=false", "training.checkpoint_every=0",
           "training.save_final=false", "data.eval=null", "data.eval_fraction=0", f"output_dir={out}"]
    _run_logged(cmd, out.parent / f"{method}.log", f"method {method}")


def peer_command(script: str, size: str, cfg: RunConfig, method: str, steps: int) -> list[str]:
    """The peer baseline's command line for the recipe's shapes (it measures after 3 warm-up steps of its own)."""
    t = cfg.training
    cmd = [sys.executable, script, "--method", peer_method(method), "--size", size, "--seq", str(cfg.data.max_length),
           "--bsz", str(t.micro_batch_size), "--zero", str(zero_stage(build_ds_config(cfg, 1))),
           "--steps", str(steps - WARMUP_STEPS)]
    virtual = BENCH_METHODS[method][0].get("num_virtual_tokens")
    if virtual:
        cmd += ["--vtokens", str(virtual)]
    return cmd + (["--ckpt"] if t.activation_checkpointing else [])


def check_peer(script: str, cfg: RunConfig, methods: list[str]) -> None:
    """Refuse before anything runs when the peer cannot run these methods on these settings."""
    if not os.path.isfile(script):
        raise UserError(f"--peer: no such file: {script}")
    if cfg.training.precision != "bf16":
        raise UserError(f"training.precision: the peer baseline runs bf16, the recipe {cfg.training.precision}")
    if cfg.training.gradient_accumulation_steps != 1:
        raise UserError("training.gradient_accumulation_steps: the peer baseline takes one micro-batch per step; set 1")
    other = [m for m in methods if peer_method(m) not in PEER_METHODS]
    if other:
        raise UserError(f"--methods: the peer baseline runs only {', '.join(PEER_METHODS)}, not {', '.join(other)}")


def run_peer(cmd: list[str], method: str, log: Path) -> dict:
    """Run the peer baseline once (its output kept in `log`); its last `RESULT {json}` line."""
    stdout = _run_logged(cmd, log, f"peer {method}")
    found = [line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not found:
        raise UserError(f"bench: peer {method} printed no RESULT line")
    return json.loads(found[-1])


def compare_with_peer(row: dict, peer: dict, base_params: int) -> dict:
    """Ratios of dstune to the peer on one method; refuses when the two did not train the same model
    (the peer reports its parameter count before PEFT adds any, so compare with dstune's base model)."""
    if peer["params"] != base_params:
        raise UserError(f"--peer-size: the peer's model has {peer['params']:,} parameters, the recipe's "
                        f"{base_params:,}; pick the peer size (or recipe) with the same shape")
    peer_peak = round(peer["peak_gib"] * 2**30)
    return {**row, "peer": peer, "tokens_per_s_vs_peer": row["tokens_per_s"] / peer["tok_s"],
            "peak_vs_peer": row["peak_bytes"] / peer_peak if row["peak_source"] == "cuda allocator" else None}


def _row(cfg: RunConfig, method: str, run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"][WARMUP_STEPS:] or [x for x in lines if x["split"] == "train"]
    step_s = statistics.median(x["step_s"] for x in train)
    tokens_per_s = statistics.median(x["tokens_per_s"] for x in train)
    recorded = json.loads((run / "memory.json").read_text())
    memory, phases = recorded["after_first_step"][0], recorded["phase_peaks"][0]
    cuda = "allocator_peak" in phases
    # peak over the whole run: the allocator's on a GPU, the process's peak RSS on CPU
    peak = max(phases["allocator_peak"].values()) if cuda else phases["peak_rss"]
    est_cfg = cfg.model_copy(update={"methods": BENCH_METHODS[method]})
    (est, *_), _, info_est = estimate(est_cfg, info["world_size"], cuda=cuda)
    return {"method": method, "trainable_params": info["trainable_params"], "tokens_per_s": tokens_per_s,
            "step_s": step_s, "mfu": mfu(tokens_per_s, info_est["flops_per_token"], info["world_size"]), "peak_bytes": peak,
            "peak_source": "cuda allocator" if cuda else "peak RSS",
            "device_peak_bytes": max(phases["device_peak"].values()) if cuda and phases["device_peak"] else None,
            "phase_peaks": phases,
            "estimate_bytes": est.total, "estimate": est.as_dict(),
            "model_state_bytes_measured": memory["weights"] + memory["gradients"] + memory["optimizer_states"]}


def bench(recipe: str, overrides: list[str], methods: list[str], out_dir: str, steps: int,
          peer: str | None = None, peer_size: str = "1b") -> list[dict]:
    """Run every method (and, with `peer`, the peer baseline script on the same shapes), then write
    bench.md, bench.json and bench.png to out_dir."""
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(BENCH_METHODS)}")
    if steps <= WARMUP_STEPS:
        raise UserError(f"--steps: must be more than the {WARMUP_STEPS} warm-up steps")
    cfg = load_config(recipe, overrides)
    if peer:
        check_peer(peer, cfg, methods)
    out = Path(out_dir)
    rows, peer_results = [], {}
    bar = tqdm(methods, desc="bench", unit="method")
    for method in bar:
        peer_result = None
        if peer:  # first, so a peer that cannot run fails before dstune's run; once per peer method
            name = peer_method(method)
            if name not in peer_results:
                bar.set_postfix_str(f"{method}: peer")
                peer_results[name] = run_peer(peer_command(peer, peer_size, cfg, method, steps), name,
                                              out / f"{name}-peer.log")
            peer_result = peer_results[name]
        bar.set_postfix_str(f"{method}: dstune")
        _run_one(recipe, overrides, method, out / method, steps)
        row = _row(cfg, method, out / method)
        if peer_result is not None:
            base = json.loads((out / method / "run.json").read_text())["base_params"]
            row = compare_with_peer(row, peer_result, base)
        rows.append(row)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    (out / "bench.md").write_text(markdown(rows))
    plot(rows, out / "bench.png")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | trainable params | step (s) | tokens/s | MFU | peak memory | estimate | model states measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {m} "
                     f"| {human_bytes(r['peak_bytes'])} ({r['peak_source']}) | {human_bytes(r['estimate_bytes'])} "
                     f"| {human_bytes(r['model_state_bytes_measured'])} |")
    if any("peer" in r for r in rows):
        lines += ["", "Against the peer baseline (same shapes, same call):", "",
                  "| method | tokens/s | peer tokens/s | × peer | peak memory | peer peak | × peer |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if "peer" in r):
            p = r["peer"]
            peak_ratio = "n/a" if r["peak_vs_peer"] is None else f"{r['peak_vs_peer']:.2f}"
            lines.append(f"| {r['method']} | {r['tokens_per_s']:,.0f} | {p['tok_s']:,.0f} "
                         f"| {r['tokens_per_s_vs_peer']:.2f} | {human_bytes(r['peak_bytes'])} "
                         f"| {human_bytes(p['peak_gib'] * 2**30)} | {peak_ratio} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Estimated memory by part, stacked per method, with the measured peak marked; tokens/s beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["weights", "gradients", "optimizer_states", "activations", "buffers"]
    names = [r["method"] for r in rows]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [r["estimate"][part] / 2**20 for r in rows]
        mem.bar(names, values, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    mem.scatter(names, [r["peak_bytes"] / 2**20 for r in rows], color="black", marker="_", s=600, zorder=3,
                label=f"measured peak ({rows[0]['peak_source']})")
    mem.scatter(names, [r["model_state_bytes_measured"] / 2**20 for r in rows], color="tab:red", marker="x", zorder=3,
                label="measured model states (engine tensors)")
    peers = [(r["method"], r["peer"]["peak_gib"] * 2**10) for r in rows if "peer" in r]
    if peers:
        mem.scatter(*zip(*peers), color="tab:gray", marker="_", s=600, zorder=3, label="peer's measured peak")
    if rows[0]["peak_source"] != "cuda allocator":
        mem.set_yscale("symlog")  # a CPU process's RSS dwarfs a tiny model; keep both visible
    mem.set_ylabel("MiB per rank")
    mem.set_title("memory: estimate by part vs measured")
    mem.legend(fontsize=8)
    if any("peer" in r for r in rows):  # dstune and the peer side by side per method
        x = range(len(rows))
        speed.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in rows], width=0.4, label="dstune")
        speed.bar([i + 0.2 for i in x], [r["peer"]["tok_s"] if "peer" in r else 0 for r in rows], width=0.4,
                  color="tab:gray", label="peer (HF + PEFT + DeepSpeed)")
        speed.set_xticks(list(x), names)
        speed.legend(fontsize=8)
    else:
        speed.bar(names, [r["tokens_per_s"] for r in rows], color="tab:gray")
    speed.set_ylabel("tokens / s")
    speed.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
