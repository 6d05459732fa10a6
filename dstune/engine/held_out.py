"""A run's held-out side: its scores before training (and the untouched base's, where its methods change the
model before any step), every N steps with the best state kept, and after; each logged to its metrics and
merged into its results.json. A run of one (engine/train_run.py) has one; a job of several adapters
(engine/adapters_run.py) one per adapter."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from dstune.config import RunConfig
from dstune.engine.best import Best
from dstune.engine.distributed import Dist, gather_objects
from dstune.telemetry.trackers import RunLog

COLUMNS = {"base": "base model", "before": "before", "after": "after"}  # results.json key → table column


class HeldOut:
    """The run's metric log and held-out side. `score()`: the held-out metrics now; `save_best(step)`: keep
    the trainable state as best.safetensors (every rank takes part in both). `results` is the run's
    results.json as this process knows it (rank 0: merged with the file's)."""

    def __init__(self, cfg: RunConfig, data, dist: Dist, step: int, score: Callable[[], dict],
                 save_best: Callable[[int], None]):
        self.run_dir, self.cfg, self.data, self.dist = Path(cfg.output_dir), cfg, data, dist
        self.score, self.save_best = score, save_best
        self.log = RunLog(self.run_dir, cfg, dist.is_main, step)  # the run's metric log (its loop logs there too)
        self.earlier = self._earlier(step)
        self.results: dict = dict(self.earlier)  # an earlier start's scores stay (a finished adapter's, 'before')
        self.last_eval: tuple[int, dict] | None = None  # (step, scores) of the newest evaluation
        ev = cfg.evaluation
        watch = ev.watched() if data.eval is not None else None
        self.best = Best.resumed(watch, ev.early_stopping is not None, self.earlier) if watch else None

    def _earlier(self, step: int) -> dict:
        """An earlier start's results.json (read by rank 0, given to every rank) on a resume, else {}."""
        path = self.run_dir / "results.json"
        mine = json.loads(path.read_text()) if self.dist.is_main and step and path.exists() else {}
        return gather_objects(mine)[0]

    def write(self) -> None:
        """Merge into results.json (rank 0), so a resumed run keeps the 'before' score of its first start."""
        if not self.dist.is_main:
            return
        path = self.run_dir / "results.json"
        self.results = {**(json.loads(path.read_text()) if path.exists() else {}), **self.results}
        path.write_text(json.dumps(self.results, indent=1))

    def before(self, step: int, changes_output_at_init: bool, base_only) -> None:
        """At step 0: the scores before training, and the untouched base's when the methods change the model
        before any step (prompt tuning, an ungated prefix); on a resume, a check of the held-out rows."""
        if self.data.eval is None:
            return
        held_out = held_out_id(self.data.eval)
        if step != 0:
            self._keep_or_restart_table(held_out, step)
            return
        self.results["held_out"] = held_out
        if changes_output_at_init:
            with base_only():
                self.results["base"] = self.score()
        self.results["before"] = self.score()
        self.log.write(0, "eval", self.results["before"])
        self.write()

    def _keep_or_restart_table(self, held_out: dict, step: int) -> None:
        """A continued run scores 'after' on the rows its 'before' was scored on. When the held-out set changed
        since (another evaluation.max_samples or data.eval), the results table starts anew: the earlier
        columns are dropped and one line says so, so no table compares two sets of rows."""
        path = self.run_dir / "results.json"
        if not self.dist.is_main or not path.exists():
            return
        earlier = json.loads(path.read_text())
        if earlier.get("held_out", held_out) == held_out:
            return
        print(f"[dstune] the held-out rows differ from those this run was first scored on "
              f"({earlier['held_out']['rows']:,} rows then, {held_out['rows']:,} now): its results table starts "
              f"anew at step {step}, without the earlier columns", flush=True)
        kept = {k: v for k, v in earlier.items() if k not in COLUMNS}
        self.results = {**{k: v for k, v in self.results.items() if k not in COLUMNS}, "held_out": held_out}
        path.write_text(json.dumps({**kept, "held_out": held_out}, indent=1))

    def now(self, step: int) -> dict[str, float]:
        """The scores at this step, logged; with keep_best, the trainable state kept when they are the best
        yet."""
        scores = self.score()
        self.log.write(step, "eval", scores)
        self.last_eval = (step, scores)
        if self.best is not None:
            if self.best.improved(step, scores):
                self.save_best(step)
            self.results["best"] = self.best.as_dict()
            self.write()
        return scores

    def after(self, step: int) -> None:
        """The scores at the last step (this step's evaluation when there was one: early stopping's)."""
        if self.data.eval is not None:
            done = self.last_eval is not None and self.last_eval[0] == step
            self.results["after"] = self.last_eval[1] if done else self.now(step)
        self.results["steps"] = step
        self.write()


def results_columns(results: dict) -> dict[str, dict]:
    """results.json as the results table's columns: base model, before, after, and the best step's."""
    columns = {COLUMNS[k]: results[k] for k in COLUMNS if k in results}
    if best := results.get("best"):
        columns[f"best (step {best['step']})"] = best["scores"]
    return columns


def held_out_id(ds) -> dict:
    """Which rows a held-out set holds: their number and a digest of their tokens and targets."""
    digest = hashlib.sha256()
    for batch in ds.select_columns([c for c in ("input_ids", "labels") if c in ds.column_names]).iter(1024):
        digest.update(json.dumps(batch).encode())
    return {"rows": len(ds), "sha256": digest.hexdigest()[:16]}
