"""logging.report_to: metrics and the resolved recipe reach W&B (offline) and MLflow (a local file store),
from rank 0 alone, as the libraries themselves record them."""
from __future__ import annotations

import json

import pytest

from helpers import lm_recipe, ok, read_metrics, run_cli


@pytest.mark.slow
def test_two_ranks_log_one_run_to_wandb_and_mlflow(ws, built_ops, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 wants a database; a file store still works
    uri = f"file:{tmp_path / 'mlruns'}"
    recipe = lm_recipe(ws, tmp_path, "run", 2, max_steps=4, log_every=1)
    ok(run_cli(["train", recipe, "logging.report_to=[jsonl, wandb, mlflow]", "logging.project=dstune-test",
                f"logging.mlflow_tracking_uri={uri}"], nproc=2,
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}))
    run = tmp_path / "run"
    losses = {s: r["loss"] for s, r in read_metrics(run).items()}
    assert sorted(losses) == [1, 2, 3, 4]
    assert not (run / "tensorboard").exists()   # not asked for

    # W&B: one offline run (rank 0's); its transaction log holds every step's loss and the recipe as config
    # (JSON values inside protobuf records: read as bytes, there is no offline reader in wandb 0.31)
    [offline] = (run / "wandb").glob("offline-run-*")
    log = next(offline.glob("run-*.wandb")).read_bytes()
    assert all(json.dumps(loss).encode() in log for loss in losses.values()) and b"train/loss" in log
    assert b'"lr":0.003' in log and str(run).encode() in log

    # MLflow: one run in the experiment, the recipe as params (and config.yaml), every step's loss
    client = mlflow.MlflowClient(tracking_uri=uri)
    [mlrun] = client.search_runs([client.get_experiment_by_name("dstune-test").experiment_id])
    assert mlrun.data.params["training.lr"] == "0.003" and mlrun.data.params["task"] == "causal_lm"
    history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "train/loss")}
    assert history == pytest.approx(losses)
    assert "config.yaml" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


def test_a_tracker_that_refuses_to_start_is_one_line(ws, built_ops, tmp_path):
    pytest.importorskip("mlflow")
    res = run_cli(["train", lm_recipe(ws, tmp_path, "run", max_steps=2), "logging.report_to=[mlflow]",
                   f"logging.mlflow_tracking_uri=file:{tmp_path / 'mlruns'}"], env={"MLFLOW_ALLOW_FILE_STORE": "false"})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("dstune: error: logging.report_to: mlflow did not start: ")


def test_a_tracker_that_is_not_installed_is_named_before_anything_runs(ws, tmp_path, monkeypatch):
    import importlib.util

    from dstune.config import load_config
    from dstune.errors import UserError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"logging\.report_to: wandb not installed here: pip install 'dstune\[wandb\]'"):
        load_config(lm_recipe(ws, tmp_path, "run"), ["logging.report_to=[jsonl, wandb]"])
