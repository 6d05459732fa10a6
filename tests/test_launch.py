"""`dstune launch`: the exact commands it runs for each launcher, and its refusals of bad input."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dstune.errors import UserError
from dstune.launch import LAUNCH_DIR, parse_hostfile, plan_launch


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"task": "causal_lm", "model": {"tiny": "gpt2"}, "tokenizer": {"path": "tok"},
                                "data": {"train": "lm.jsonl"}, "output_dir": str(tmp_path / "run")}))
    return path


def dstune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def dry_run(recipe: Path, *args: str) -> list[str]:
    """The launcher command `dstune launch --dry-run` prints, split back into argv."""
    res = dstune("launch", "--dry-run", *args, str(recipe), "training.lr=0.01", cwd=recipe.parent)
    assert res.returncode == 0, res.stderr
    assert not (recipe.parent / "run").exists(), "a dry run must write nothing"
    return shlex.split(res.stdout.strip().splitlines()[-1]), res.stdout


def test_deepspeed_one_node(recipe):
    argv, _ = dry_run(recipe, "--procs-per-node", "8")
    assert argv == ["deepspeed", "--master_port", "29500", "--num_gpus", "8", "--module", "dstune", "train",
                    str(recipe), "training.lr=0.01"]


def test_deepspeed_over_ssh_writes_a_hostfile(recipe):
    argv, out = dry_run(recipe, "--hosts", "gpu-a,gpu-b", "--procs-per-node", "4")
    hostfile = str(recipe.parent / "run" / "hostfile")
    assert argv == ["deepspeed", "--master_port", "29500", "--hostfile", hostfile, "--master_addr", "gpu-a",
                    "--launcher", "pdsh", "--module", "dstune", "train", str(recipe), "training.lr=0.01"]
    assert f"# writes {hostfile}:\n#   gpu-a slots=4\n#   gpu-b slots=4\n" in out
    assert "DS_ENV_FILE=" in out  # what the remote ranks need from this environment


def test_deepspeed_without_ssh(recipe, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\ngpu-a slots=2\n\ngpu-b slots=2  # spare\n")
    argv, _ = dry_run(recipe, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1", "--master-port", "6000")
    assert argv == ["deepspeed", "--master_port", "6000", "--hostfile", str(hostfile), "--master_addr", "gpu-a",
                    "--no_ssh", "--node_rank", "1", "--module", "dstune", "train", str(recipe), "training.lr=0.01"]


def test_torchrun_static_rendezvous(recipe):
    argv, _ = dry_run(recipe, "--launcher", "torchrun", "--nodes", "4", "--node-rank", "2", "--master-addr",
                      "10.0.0.1", "--procs-per-node", "8")
    assert argv == ["torchrun", "--nnodes", "4", "--node_rank", "2", "--nproc_per_node", "8", "--master_addr",
                    "10.0.0.1", "--master_port", "29500", "--rdzv_conf", "timeout=600", "-m", "dstune", "train",
                    str(recipe), "training.lr=0.01"]


def test_slurm_sbatch_line(recipe):
    argv, _ = dry_run(recipe, "--launcher", "slurm", "--nodes", "2", "--procs-per-node", "8",
                      "--sbatch-arg=--gpus-per-node=8", "--sbatch-arg=--partition=gpu")
    run = recipe.parent / "run"
    assert argv == ["sbatch", "--nodes=2", "--ntasks-per-node=8", "--job-name=dstune-run",
                    f"--output={run}/slurm-%j.out", "--gpus-per-node=8", "--partition=gpu",
                    str(LAUNCH_DIR / "slurm.sbatch"), str(recipe), "training.lr=0.01"]


def test_user_strings_reach_the_launcher_unchanged(recipe):
    """Arguments go through the scripts as "$@": spaces and quotes survive, nothing is expanded."""
    value = "data.train=my data/$HOME's file.jsonl"
    res = dstune("launch", "--dry-run", "--launcher", "torchrun", str(recipe), value, cwd=recipe.parent)
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout.strip().splitlines()[-1])[-1] == value


@pytest.mark.parametrize("text, message", [
    ("node1 slots=1\nnode2 slot=1\n", "hosts:2: expected 'HOST slots=N', got 'node2 slot=1'"),
    ("node1 slots=1\nnode1 slots=2\n", "hosts:2: node1 is listed twice"),
    ("node1 slots=0\n", "hosts:1: node1 has slots=0; give each node at least one slot"),
    ("# nothing here\n\n", "hosts: the hostfile lists no hosts"),
])
def test_bad_hostfile_names_the_line(tmp_path, text, message):
    (tmp_path / "hosts").write_text(text)
    with pytest.raises(UserError) as e:
        parse_hostfile(tmp_path / "hosts")
    assert str(e.value) == f"{tmp_path}/{message}"


def test_bad_hostfile_on_the_command_line(recipe, tmp_path):
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=one\n")
    res = dstune("launch", "--hostfile", str(tmp_path / "hosts"), str(recipe), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"dstune: error: {tmp_path / 'hosts'}:2: expected 'HOST slots=N', got 'node2 slots=one'"
    assert not (tmp_path / "run").exists()


def plan(launcher="deepspeed", **kw):
    return plan_launch(launcher, "r.yaml", [], "runs/x", 600, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(hosts=["a", "b"], nodes=3), "--nodes 3 does not match the 2 host(s) in --hosts"),
    (dict(launcher="torchrun", nodes=2, master_addr="a"), "--node-rank: torchrun runs on every node"),
    (dict(launcher="torchrun", nodes=2, node_rank=2, master_addr="a"), "--node-rank 2: must be in 0..1"),
    (dict(launcher="torchrun", nodes=2, node_rank=0), "--master-addr: needed with --nodes > 1"),
    (dict(nodes=2), "--hostfile: DeepSpeed needs a hostfile (or --hosts) for more than one node"),
    (dict(hosts=["a", "b"], no_ssh=True), "--node-rank: with --no-ssh a launcher runs on every node"),
    (dict(hosts=["a", "a"]), "--hosts: a host is listed twice"),
    (dict(hosts=["", " "]), "--hosts: no host names given"),
    (dict(procs_per_node=0), "--procs-per-node: must be at least 1"),
    (dict(nodes=0), "--nodes: must be at least 1"),
    (dict(master_port=70000), "--master-port: 70000 is not a TCP port"),
    (dict(launcher="mpirun"), "--launcher: 'mpirun' is not one of deepspeed, torchrun, slurm"),
    (dict(hosts=["a"], hostfile="h"), "--hostfile and --hosts: give one of them"),
    (dict(hosts=["-oProxyCommand=touch /tmp/x", "b"]), "--hosts: '-oProxyCommand=touch /tmp/x' is not a host name"),
    (dict(hosts=["a;touch x", "b"]), "--hosts: 'a;touch x' is not a host name"),
    (dict(hosts=["a", "b"], master_addr="127.0.0.1;touch x"), "--master-addr: '127.0.0.1;touch x' is not a host"),
    (dict(launcher="torchrun", nodes=2, node_rank=0, master_addr="$(touch x)"), "--master-addr: '$(touch x)' is not"),
    (dict(hosts=["node-1.cluster", "10.0.0.2"], master_addr="fe80::1"), None),
    (dict(hosts=["a", "b"], procs_per_node=None, launcher="torchrun", node_rank=0), None),
])
def test_bad_launch_settings(kw, message):
    if message is None:  # the control case: a valid launch plans without error
        plan(**kw)
        return
    with pytest.raises(UserError) as e:
        plan(**kw)
    assert str(e.value).startswith(message)


def test_hostfile_problems_for_each_launcher(tmp_path):
    (tmp_path / "hosts").write_text("a slots=2\nb slots=2\n")
    with pytest.raises(UserError, match=r"^--hostfile: Slurm picks the nodes; use --nodes"):
        plan("slurm", hostfile=str(tmp_path / "hosts"))
    with pytest.raises(UserError, match=r"^--procs-per-node 4 does not match the slots in .*hosts$"):
        plan(hostfile=str(tmp_path / "hosts"), procs_per_node=4)
    with pytest.raises(UserError, match=r"^.*missing: cannot read hostfile \(No such file or directory\)$"):
        parse_hostfile(tmp_path / "missing")


def test_kernels_build_without_cuda_says_why(tmp_path):
    if torch_cuda():
        pytest.skip("CUDA is present: the build would run")
    res = dstune("kernels", "build", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == "dstune: error: kernels build: no CUDA device"


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def test_node_count_must_match_the_hostfile(recipe, tmp_path):
    (tmp_path / "hosts").write_text("a slots=1\nb slots=1\n")
    res = dstune("launch", "--hostfile", str(tmp_path / "hosts"), "--nodes", "3", str(recipe), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"dstune: error: --nodes 3 does not match the 2 host(s) in {tmp_path / 'hosts'}"


def test_torchrun_needs_equal_slots(tmp_path):
    (tmp_path / "hosts").write_text("a slots=2\nb slots=4\n")
    with pytest.raises(UserError, match="slots differ"):
        plan("torchrun", hostfile=str(tmp_path / "hosts"), node_rank=0)


def test_ssh_launch_refuses_what_a_remote_shell_would_split(tmp_path):
    with pytest.raises(UserError, match="remote shell"):
        plan_launch("deepspeed", "r.yaml", ["data.train=a b.jsonl"], "runs/x", 600, hosts=["a", "b"])
    # without ssh the arguments never meet a shell
    plan_launch("deepspeed", "r.yaml", ["data.train=a b.jsonl"], "runs/x", 600, hosts=["a", "b"], no_ssh=True,
                node_rank=0)


def test_missing_recipe(tmp_path):
    res = dstune("launch", "--dry-run", "nope.yaml", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == "dstune: error: nope.yaml: recipe not found"


def test_bad_recipe_is_refused_before_launch(recipe, tmp_path):
    res = dstune("launch", "--launcher", "torchrun", str(recipe), "training.lr=fast", cwd=tmp_path)
    assert res.returncode == 2 and "training.lr" in res.stderr
    assert not (tmp_path / "run").exists()


def test_scripts_are_valid_bash():
    for script in ("common.sh", "deepspeed.sh", "torchrun.sh", "slurm.sbatch"):
        res = subprocess.run(["bash", "-n", str(LAUNCH_DIR / script)], capture_output=True, text=True)
        assert res.returncode == 0, (script, res.stderr)


def test_slurm_takes_hosts_as_a_nodelist_without_a_hostfile(recipe):
    argv, out = dry_run(recipe, "--launcher", "slurm", "--hosts", "gpu-a,gpu-b")
    assert "--nodes=2" in argv and "--nodelist=gpu-a,gpu-b" in argv
    assert "# writes" not in out


def test_hostfile_host_that_is_an_option_is_refused(tmp_path):
    (tmp_path / "hosts").write_text("a slots=1\n-oProxyCommand=touch slots=1\n")
    with pytest.raises(UserError) as e:
        parse_hostfile(tmp_path / "hosts")
    assert str(e.value).startswith(f"{tmp_path}/hosts:2: '-oProxyCommand=touch' is not a host name")


def test_ssh_launch_refuses_a_working_directory_a_remote_shell_would_split(recipe, tmp_path):
    for name in ("with space", "$(touch pwned)"):
        cwd = tmp_path / name
        cwd.mkdir()
        res = dstune("launch", "--dry-run", "--hosts", "a,b", str(recipe), cwd=cwd)
        assert res.returncode == 2, res.stderr
        assert "directory in a remote shell" in res.stderr and not (cwd / "pwned").exists()
        assert not list(cwd.iterdir())
