"""`dstune active-learn`: the active-learning loop simulated on a labelled pool, its labels the oracle.

For every strategy and seed: start from `initial` rows drawn at random (the same rows for every strategy
of a seed), then each round train the recipe on the labelled rows (in this process), score the rest of the pool with the
trained run (`dstune select`'s scores) and label the `per_round` most informative. Each round trains from
the base model (`retrain="base"`), or from the previous round's model (`"continue"`: its run exported
with its methods merged into the weights, OUT/STRATEGY/seedN/roundR/merged, which the next round's
recipe loads as model.path; methods that cannot merge are refused). The held-out metric after each round
makes the learning curve: OUT/curve.json (every run), curve.md (mean and spread over seeds per
labelled-set size) and curve.png. Each round's run dir and picked rows stay in OUT/STRATEGY/seedN/; a
rerun with the same settings (OUT/loop.json) skips what finished, so an interrupted loop resumes at its
round.
"""
from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import numpy as np

from dstune.errors import UserError


def _train(recipe: str, overrides: list[str], run: Path, labelled: Path, seed: int) -> dict:
    """The round's run (trained here unless it already finished; its output in RUN.log): its results.json."""
    from dstune.config import load_config
    from dstune.engine.trainer import train
    from dstune.planning.fit import resolve_checkpointing

    done = run / "results.json"
    if not (done.exists() and "after" in json.loads(done.read_text())):
        cfg = load_config(recipe, [*overrides, f"data.train={labelled}", f"training.seed={seed}", f"output_dir={run}",
                                   "training.resume=false", "data.eval_fraction=0"])
        log = run.parent / f"{run.name}.log"
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                train(cfg, resolve_checkpointing)
            except UserError as e:
                raise UserError(f"active-learn: training {run} failed: {e} (whole output: {log})") from None
    return json.loads(done.read_text())


def _scores(run: Path, pool: str, strategy: str, seed: int, batch_size: int) -> np.ndarray:
    import torch

    from dstune.prepare.pipeline import prepare_pool
    from dstune.rundir.load import load_run
    from dstune.active.select import score_rows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_run(str(run), device)
    cfg, tokenizer, model, labels = loaded.cfg, loaded.tokenizer, loaded.model, loaded.labels
    _, rows = prepare_pool(cfg, tokenizer, labels, pool)
    return score_rows(model, rows, cfg.task, tokenizer, device, batch_size, strategy, seed, 0, 1,
                      cfg.evaluation.max_new_tokens)


RETRAIN = ("base", "continue")


def _check_settings(out: Path, settings: dict) -> None:
    """A loop's rounds belong to its settings: OUT/loop.json records them; other settings need another OUT."""
    f = out / "loop.json"
    if f.exists():
        old = json.loads(f.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise UserError(f"--out: {out} holds a loop with other settings ({', '.join(diff)}: "
                            f"{', '.join(repr(old.get(k)) for k in diff)}); use another --out")
    else:
        f.write_text(json.dumps(settings, indent=1))


def _merged(run: Path) -> Path:
    """The round's run with its methods folded into the weights (made once): where the next round starts."""
    from dstune.rundir.export import export

    merged = run / "merged"
    if not (merged / "config.json").exists():
        tmp = run / ".merged-partial"
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        export(str(run), str(tmp), "merged")
        tmp.rename(merged)
    return merged


def run_loop(recipe: str, overrides: list[str], pool: str, rounds: int, per_round: int, initial: int,
             strategies: list[str], seeds: list[int], out: Path, batch_size: int = 32,
             retrain: str = "base") -> dict:
    from dstune.config import load_config
    from dstune.data.files import load_table
    from dstune.active.select import check_strategy
    from dstune.methods import build_methods
    from dstune.tasks import get_task

    cfg = load_config(recipe, overrides)
    if not cfg.data.eval:
        raise UserError("data.eval: the learning curve is the held-out metric after each round; name an eval file")
    for s in strategies:
        check_strategy(cfg.task, s)
    if retrain not in RETRAIN:
        raise UserError(f"--retrain: {retrain!r} is none of {', '.join(RETRAIN)}")
    blocked = [m.name for m in build_methods(cfg.methods) if not m.mergeable] if retrain == "continue" else []
    if blocked:
        raise UserError(f"--retrain continue: {', '.join(blocked)} cannot be folded into the weights the next "
                        "round starts from; use --retrain base")
    rows = [json.loads(line) for line in Path(pool).read_text(encoding="utf-8").splitlines() if line.strip()] \
        if pool.endswith(".jsonl") else load_table(pool, "--pool").to_list()
    need = initial + rounds * per_round
    if need > len(rows):
        raise UserError(f"--rounds/--per-round: {initial} + {rounds} x {per_round} = {need} rows, the pool has "
                        f"{len(rows):,}")
    _check_settings(out, {"recipe": recipe, "overrides": overrides, "pool": pool, "initial": initial,
                          "per_round": per_round, "retrain": retrain})
    metric = get_task(cfg.task).headline_metric
    curve: dict = {"metric": metric, "task": cfg.task, "retrain": retrain, "runs": {}}
    for seed in seeds:
        first = np.random.default_rng(seed).permutation(len(rows))[:initial].tolist()
        for strategy in strategies:
            where = out / strategy / f"seed{seed}"
            where.mkdir(parents=True, exist_ok=True)
            chosen, points = list(first), []
            for r in range(rounds + 1):
                picks = where / f"round{r}.json"  # the labelled rows of this round, by pool index
                if picks.exists():
                    chosen = json.loads(picks.read_text())
                else:
                    picks.write_text(json.dumps(chosen))
                labelled = where / f"round{r}.jsonl"
                labelled.write_text("".join(json.dumps(rows[i]) + "\n" for i in chosen))
                start = [] if retrain == "base" or r == 0 else [
                    f"model.path={_merged(where / f'round{r - 1}')}", "model.gguf_file=null", "model.tiny=null"]
                result = _train(recipe, [*overrides, *start], where / f"round{r}", labelled, seed)
                points.append({"labelled": len(chosen), metric: result["after"][metric]})
                print(f"[dstune] {strategy} seed {seed} round {r}: {len(chosen)} labelled, {metric} "
                      f"{result['after'][metric]:.4f}", flush=True)
                if r == rounds:
                    break
                nxt = where / f"round{r + 1}.json"
                if not nxt.exists():
                    scores = _scores(where / f"round{r}", pool, strategy, seed + r, batch_size)
                    scores[chosen] = -np.inf  # labelled already
                    nxt.write_text(json.dumps(chosen + np.argsort(-scores, kind="stable")[:per_round].tolist()))
                chosen = json.loads(nxt.read_text())
            curve["runs"].setdefault(strategy, {})[str(seed)] = points
            write_reports(curve, out)
    return curve


def summary(curve: dict) -> dict[str, list[tuple[int, float, float]]]:
    """Per strategy: (labelled rows, mean, standard deviation over seeds) per round."""
    metric, out = curve["metric"], {}
    for strategy, by_seed in curve["runs"].items():
        per_round = list(zip(*by_seed.values()))
        out[strategy] = [(pts[0]["labelled"], statistics.mean(p[metric] for p in pts),
                          statistics.stdev(p[metric] for p in pts) if len(pts) > 1 else 0.0) for pts in per_round]
    return out


def write_reports(curve: dict, out: Path) -> None:
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    table = summary(curve)
    strategies = list(table)
    sizes = [n for n, _, _ in table[strategies[0]]]
    seeds = ", ".join(f"{s}: {len(curve['runs'][s])}" for s in strategies)
    lines = [f"held-out {curve['metric']} after each round, mean ± standard deviation over seeds ({seeds})", "",
             "| labelled rows | " + " | ".join(strategies) + " |", "|---:|" + "---:|" * len(strategies)]
    for i, n in enumerate(sizes):
        cells = [f"{table[s][i][1]:.4f} ± {table[s][i][2]:.4f}" if i < len(table[s]) else "" for s in strategies]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    _plot(curve, table, out / "curve.png")


def _plot(curve: dict, table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy, pts in table.items():
        n, mean, sd = (np.array(x, dtype=float) for x in zip(*pts))
        ax.plot(n, mean, marker="o", label=f"{strategy} ({len(curve['runs'][strategy])} seeds)")
        ax.fill_between(n, mean - sd, mean + sd, alpha=0.2)
    ax.set_xlabel("labelled rows")
    ax.set_ylabel(f"held-out {curve['metric']}")
    ax.set_title(f"active learning ({curve['task']}): mean ± 1 sd over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
