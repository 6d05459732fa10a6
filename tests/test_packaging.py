"""dstune as users install it: the lock covers every dependency, and the wheel works outside the repository."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from helpers import REPO, ok, run_cli


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_lock_pins_every_dependency_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    pinned = dict(line.split("==", 1) for line in (REPO / "requirements" / "lock.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    assert wanted - pinned.keys() == set(), "pyproject.toml names packages the lock lacks: run `make lock`"
    import transformers
    assert pinned["transformers"] == transformers.__version__  # this environment is the locked one


@pytest.mark.slow
def test_wheel_works_from_any_directory_in_a_fresh_venv(ws, built_ops, tmp_path):
    """Build the wheel, install it into a new venv (dependencies taken from this environment, not
    reinstalled), and run train, estimate and a launch dry run from a directory outside the repository."""
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel, = dist.glob("dstune-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    # torch, DeepSpeed, transformers ... from this environment: a path line only, so this environment's own
    # (editable) dstune is not put on the path
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import dstune; print(dstune.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where

    recipe = elsewhere / "tiny.yaml"  # deepspeed: zero0 by default, read from the installed package
    recipe.write_text(json.dumps({
        "task": "causal_lm", "model": {"tiny": "llama"}, "tokenizer": {"path": str(ws / "tokenizer")},
        "data": {"train": str(ws / "lm.jsonl"), "max_length": 24}, "methods": [{"name": "lora", "r": 4}],
        "training": {"precision": "fp32", "max_steps": 2, "micro_batch_size": 8}, "output_dir": "runs/tiny"}))

    def dstune(*args: str):
        return ok(run_cli(list(args), cwd=elsewhere, command=[str(venv / "bin" / "dstune")]))

    dstune("train", "tiny.yaml", "deepspeed=zero2")
    assert (elsewhere / "runs" / "tiny" / "trainable.safetensors").is_file()
    assert json.loads(dstune("estimate", "tiny.yaml", "--json").stdout)
    plan = dstune("launch", "--dry-run", "--launcher", "slurm", "--nodes", "2", "--procs-per-node", "2",
                  "tiny.yaml").stdout
    script = site / "dstune" / "launchers" / "slurm.sbatch"
    assert str(script) in plan and script.is_file()
