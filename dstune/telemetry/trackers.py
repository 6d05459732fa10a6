"""Where a run's metrics go: metrics.jsonl and TensorBoard in the run dir, Weights & Biases, MLflow.

Rank 0 alone logs (`logging.report_to`). Each tracker is its library used as its users use it: the run's
resolved recipe is its config (W&B config, MLflow params plus config.yaml as an artifact), metrics are
`split/name` at the optimizer step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dstune.config import RunConfig
from dstune.errors import UserError, first_line


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Jsonl:
    """metrics.jsonl: one JSON object per logged step and split. A run continued from step S first drops what an
    earlier start logged after S (that start's steps past its last checkpoint run again); a run starting at
    step 0 starts the file anew."""

    def __init__(self, run_dir: Path, cfg: RunConfig, from_step: int = 0):
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if from_step and _logged_step(line) <= from_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
        self.f = open(path, "a")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        self.f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class TensorBoard:
    def __init__(self, run_dir: Path, cfg: RunConfig, from_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard hides what an earlier start logged after the step this one continues from
        self.w = SummaryWriter(str(run_dir / "tensorboard"), purge_step=from_step + 1 if from_step else None)

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.w.close()


class WandB:
    """A W&B run in the run dir (`wandb/`); WANDB_MODE=offline keeps it local until `wandb sync`."""

    def __init__(self, run_dir: Path, cfg: RunConfig, from_step: int = 0):
        import wandb
        self.run = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or run_dir.name,
                              dir=str(run_dir), config=cfg.model_dump(mode="json"), resume="allow",
                              id=_run_id(run_dir, "wandb"))

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in the experiment `logging.project`; the recipe's settings are its params."""

    def __init__(self, run_dir: Path, cfg: RunConfig, from_step: int = 0):
        import mlflow
        if cfg.logging.mlflow_tracking_uri:
            mlflow.set_tracking_uri(cfg.logging.mlflow_tracking_uri)
        mlflow.set_experiment(cfg.logging.project)
        self.mlflow = mlflow
        resumed = (run_dir / "mlflow_run_id").read_text().strip() if (run_dir / "mlflow_run_id").exists() else None
        self.run = mlflow.start_run(run_id=resumed,
                                    run_name=None if resumed else (cfg.logging.run_name or run_dir.name))
        (run_dir / "mlflow_run_id").write_text(self.run.info.run_id)
        if not resumed:  # params are write-once in MLflow
            recipe = cfg.model_dump(mode="json")
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(recipe).items()})  # MLflow's value limit
            mlflow.log_dict(recipe, "config.yaml")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"jsonl": Jsonl, "tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (the process died mid-write) counts as past any."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _run_id(run_dir: Path, tracker: str) -> str:
    """One id per run dir, kept in it, so a resumed run goes on logging into the same tracker run."""
    path = run_dir / f"{tracker}_run_id"
    if not path.exists():
        import uuid
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


class RunLog:
    """The trackers `logging.report_to` names, on rank 0 only (the other ranks' RunLog does nothing), for a
    run that starts or continues at `from_step`."""

    def __init__(self, run_dir: Path, cfg: RunConfig, enabled: bool, from_step: int = 0):
        self.trackers = []
        for name in cfg.logging.report_to if enabled else []:
            try:
                self.trackers.append(TRACKERS[name](run_dir, cfg, from_step))
            except Exception as e:  # noqa: BLE001 - whatever the library refuses (a URI, a login, a store)
                self.close()
                raise UserError(f"logging.report_to: {name} did not start: {first_line(e)}") from None

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, split, values)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
