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
from dstune.engine.precision import resolve
from dstune.errors import UserError
from dstune.methods import bench_overrides, bench_presets
from dstune.planning.estimate import estimate
from dstune.planning.flops import mfu
from dstune.planning.report import human_bytes

WARMUP_STEPS = 2  # first steps include allocator growth and lazy init: left out of the medians


PEER_METHODS = ("full", "lora", "prefix", "prompt")  # what the peer baseline script can run


def peer_method(method: str) -> str:
    """The peer's name for a bench method: its tuning method's (prefix-split is prefix tuning; layerwise_lr,
    which trains with full, is layerwise_lr)."""
    return bench_presets()[method][-1]["name"]


def _run_logged(cmd: list[str], log: Path, what: str) -> str:
    """Run one child process, keep its whole output in `log`; its stdout. A failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{res.stdout}--- stderr\n{res.stderr}")
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"bench: {what} failed (exit {res.returncode}): {tail} (whole output: {log})")
    return res.stdout


def what_runs(cfg: RunConfig, method: str) -> tuple[list[dict], str]:
    """(the `methods:` list `--methods METHOD` trains, a label saying what it is): the recipe's own method as
    written, with its options, where the recipe's methods have that name (with the same preset's other
    entries also taken from the recipe where it has them); the preset where they do not."""
    preset = bench_presets()[method]
    own = {spec["name"]: spec for spec in cfg.methods}
    if method in own:
        specs = [own.get(spec["name"], spec) for spec in preset]
        specs = specs if own[method] in specs else [own[method]]
        return specs, f"{method} (recipe: {_describe(specs, method)})"
    if method in bench_overrides() and len(preset) == 1 and preset[0]["name"] in own:  # qlora: the recipe's lora
        specs = [own[preset[0]["name"]]]
        return specs, f"{method} (recipe: {_describe(specs, preset[0]['name'])})"
    return preset, f"{method} (preset: {_describe(preset, method)})"


def _describe(specs: list[dict], method: str) -> str:
    """`r=8, target_modules=q_proj,v_proj` for one method's options; `full + layerwise_lr decay=0.8` for
    several; `defaults` when none is set."""
    def options(spec: dict) -> str:
        return ", ".join(f"{k}={_value(v)}" for k, v in spec.items() if k != "name")
    if len(specs) == 1 and specs[0]["name"] == method:
        return options(specs[0]) or "defaults"
    return " + ".join(" ".join(filter(None, [spec["name"], options(spec)])) for spec in specs)


def _value(v) -> str:
    """An option's value in a label: a list joined by commas, other values as YAML would write them."""
    if isinstance(v, list):
        return ",".join(map(str, v))
    return v if isinstance(v, str) else json.dumps(v)


def _run_one(recipe: str, overrides: list[str], method: str, specs: list[dict], out: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "dstune", "train", recipe, *overrides, f"methods={json.dumps(specs)}",
           f"training.max_steps={steps}", "training.resume=false", "training.checkpoint_every=0",
           "training.save_final=false", "data.eval=null", "data.eval_fraction=0", f"output_dir={out}",
           "logging.report_to=[jsonl]"]  # measurements, not experiments: no tracker time in the step
    _run_logged(cmd, out.parent / f"{method}.log", f"method {method}")


def peer_command(script: str, size: str, cfg: RunConfig, method: str, steps: int) -> list[str]:
    """The peer baseline's command line for the recipe's shapes (it measures after 3 warm-up steps of its own)."""
    t = cfg.training
    cmd = [sys.executable, script, "--method", peer_method(method), "--size", size, "--seq", str(cfg.data.max_length),
           "--bsz", str(t.micro_batch_size), "--zero", str(zero_stage(build_ds_config(cfg, 1))),
           "--steps", str(steps - WARMUP_STEPS)]
    virtual = what_runs(cfg, method)[0][-1].get("num_virtual_tokens")
    if virtual:
        cmd += ["--vtokens", str(virtual)]
    return cmd + (["--ckpt"] if t.activation_checkpointing is True else [])


def check_peer(script: str, cfg: RunConfig, methods: list[str]) -> None:
    """Refuse before anything runs when the peer cannot run these methods on these settings."""
    if not os.path.isfile(script):
        raise UserError(f"--peer: no such file: {script}")
    if resolve(cfg.training.precision)[0] != "bf16":
        raise UserError(f"training.precision: the peer baseline runs bf16, the recipe {cfg.training.precision}")
    if cfg.training.gradient_accumulation_steps != 1:
        raise UserError("training.gradient_accumulation_steps: the peer baseline takes one micro-batch per step; set 1")
    other = [m for m in methods if peer_method(m) not in PEER_METHODS or m in bench_overrides()]
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


def _row(cfg: RunConfig, method: str, specs: list[dict], run: Path) -> dict:
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
    est_cfg = cfg.model_copy(update={"methods": specs})
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

    presets = bench_presets()
    unknown = [m for m in methods if m not in presets]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(presets)}")
    if steps <= WARMUP_STEPS:
        raise UserError(f"--steps: must be more than the {WARMUP_STEPS} warm-up steps")
    cfg = load_config(recipe, overrides)
    if cfg.adapters:
        raise UserError("adapters: bench --methods compares methods on a recipe of one adapter; leave `adapters` "
                        "out, or measure the job against as many jobs with --adapters N")
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
        specs, ran = what_runs(cfg, method)
        extra = bench_overrides().get(method, [])
        _run_one(recipe, overrides + extra, method, specs, out / method, steps)
        row = {**_row(load_config(recipe, overrides + extra), method, specs, out / method),
               "ran": ran + "".join(f", {o}" for o in extra), "methods": specs}
        info = json.loads((out / method / "run.json").read_text())
        row["setup"] = setup(cfg, info["base_params"], info["world_size"])
        if peer_result is not None:
            row = compare_with_peer(row, peer_result, info["base_params"])
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
        lines.append(f"| {r.get('ran', r['method'])} | {r['trainable_params']:,} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {m} "
                     f"| {human_bytes(r['peak_bytes'])} ({r['peak_source']}) | {human_bytes(r['estimate_bytes'])} "
                     f"| {human_bytes(r['model_state_bytes_measured'])} |")
    if any("peer" in r for r in rows):
        lines += ["", "Against the peer baseline (same shapes, same call):", "",
                  "| method | tokens/s | peer tokens/s | × peer | peak memory | peer peak | × peer |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if "peer" in r):
            p = r["peer"]
            peak_ratio = "n/a" if r["peak_vs_peer"] is None else f"{r['peak_vs_peer']:.2f}"
            lines.append(f"| {r.get('ran', r['method'])} | {r['tokens_per_s']:,.0f} | {p['tok_s']:,.0f} "
                         f"| {r['tokens_per_s_vs_peer']:.2f} | {human_bytes(r['peak_bytes'])} "
                         f"| {human_bytes(p['peak_gib'] * 2**30)} | {peak_ratio} |")
    return "\n".join(lines) + "\n"


GENERIC_FOLDERS = {"model", "models", "hf", "weights", "checkpoint", "final", "merged", "base"}
PARTS = ["weights", "gradients", "optimizer_states", "activations", "buffers"]


def setup(cfg: RunConfig, base_params: int, world: int) -> dict:
    """What a bench measured on: the plot's title."""
    import torch
    m = cfg.model
    if m.tiny:
        model = f"tiny {m.tiny}"
    else:  # the folder, with its parent where the folder's own name says little ("model", "hf", ...)
        folder = Path(m.path.rstrip("/"))
        model = f"{folder.parent.name}/{folder.name}" if folder.name.lower() in GENERIC_FOLDERS else folder.name
        model += f"/{m.gguf_file}" if m.gguf_file else ""
        config = folder / "config.json"
        if config.is_file():
            model += f" ({json.loads(config.read_text()).get('model_type', '?')})"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"model": model, "params": base_params, "device": device, "precision": resolve(cfg.training.precision)[0],
            "seq_len": cfg.data.max_length, "micro_batch": cfg.training.micro_batch_size,
            "zero_stage": zero_stage(build_ds_config(cfg, world)), "world_size": world}


def title(s: dict | None) -> str:
    if not s:
        return "dstune bench"
    params = f"{s['params'] / 1e9:.2f}B" if s["params"] >= 1e9 else f"{s['params'] / 1e6:.1f}M"
    return (f"{s['model']}, {params} parameters; {s['world_size']} × {s['device']}; {s['precision']}, "
            f"sequence {s['seq_len']:,}, micro-batch {s['micro_batch']}, ZeRO-{s['zero_stage']}")


def _unit(largest: float) -> tuple[float, str]:
    return (2**30, "GiB") if largest >= 2 * 2**30 else (2**20, "MiB")


def _label(ax, bars, texts: list[str]) -> None:
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height()), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")


def plot(rows: list[dict], path: Path) -> None:
    """Per method, on linear axes: the estimate stacked by part beside the measured peak, the measured model
    states (and the peer's peak); tokens/s and step time beside dstune's (and the peer's). Every bar
    carries its value; the title says what was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    peer = any("peer" in r for r in rows)
    largest = max(max(r["estimate_bytes"], r["peak_bytes"], r.get("peer", {}).get("peak_gib", 0) * 2**30)
                  for r in rows)
    scale, unit = _unit(largest)
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1.6, 1]})
    x = np.arange(len(rows))
    kinds = ["estimate", "measured peak", "model states"] + (["peer peak"] if peer else [])
    width = 0.8 / len(kinds)
    at = {k: x - 0.4 + width * (i + 0.5) for i, k in enumerate(kinds)}
    bottom = np.zeros(len(rows))
    colors = plt.get_cmap("Blues")(np.linspace(0.35, 0.9, len(PARTS)))
    for part, color in zip(PARTS, colors):
        values = np.array([r["estimate"][part] for r in rows]) / scale
        mem.bar(at["estimate"], values, width, bottom=bottom, color=color, label=f"estimate: {part.replace('_', ' ')}")
        bottom += values
    _label(mem, mem.bar(at["estimate"], bottom, width, fill=False, edgecolor="none"),
           [f"{v:,.1f}" for v in bottom])
    source = rows[0]["peak_source"]
    bars = mem.bar(at["measured peak"], [r["peak_bytes"] / scale for r in rows], width, color="black",
                   label=f"measured peak ({source})")
    _label(mem, bars, [f"{r['peak_bytes'] / scale:,.1f}" for r in rows])
    bars = mem.bar(at["model states"], [r["model_state_bytes_measured"] / scale for r in rows], width,
                   color="tab:red", label="measured model states (weights, grads, optimizer)")
    _label(mem, bars, [f"{r['model_state_bytes_measured'] / scale:,.1f}" for r in rows])
    if peer:
        values = [r["peer"]["peak_gib"] * 2**30 / scale if "peer" in r else 0 for r in rows]
        _label(mem, mem.bar(at["peer peak"], values, width, color="tab:gray", label="peer's measured peak"),
               [f"{v:,.1f}" if v else "" for v in values])
    mem.set_xticks(x, [r["method"] for r in rows])
    mem.set_ylabel(f"{unit} per rank")
    mem.set_title("memory per rank")
    mem.margins(y=0.12)
    mem.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)

    series = [("dstune", [r["tokens_per_s"] for r in rows], [r["step_s"] for r in rows], "tab:blue")]
    if peer:
        series.append(("peer (HF + PEFT + DeepSpeed)", [r["peer"]["tok_s"] if "peer" in r else 0 for r in rows],
                       [r["peer"]["step_s"] if "peer" in r else 0 for r in rows], "tab:gray"))
    w = 0.8 / len(series)
    for i, (name, tok_s, step_s, color) in enumerate(series):
        bars = speed.bar(x - 0.4 + w * (i + 0.5), tok_s, w, color=color, label=name)
        _label(speed, bars, [f"{t:,.0f}\n{1000 * s:,.0f} ms" if t else "" for t, s in zip(tok_s, step_s)])
    speed.set_xticks(x, [r["method"] for r in rows])
    speed.set_ylabel("tokens / s (label: tokens/s and step time)")
    speed.set_title("throughput")
    speed.margins(y=0.18)
    speed.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    fig.suptitle(title(rows[0].get("setup")), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(bench_json: str) -> Path:
    """Write bench.md and bench.png again beside a bench.json (e.g. after the report changed)."""
    path = Path(bench_json)
    if path.is_dir():
        path = path / "bench.json"
    if not path.is_file():
        raise UserError(f"--replot: no bench.json at {path}")
    rows = json.loads(path.read_text())
    (path.parent / "bench.md").write_text(markdown(rows))
    plot(rows, path.parent / "bench.png")
    return path.parent
