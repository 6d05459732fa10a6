"""Multi-node launches on two real nodes and a real Slurm cluster (tests/cluster.py stands them up).

Each launcher is proven once, end to end, with `dstune launch`: a tiny ZeRO-3 LoRA fine-tune across the two
nodes through `torchrun`, `deepspeed --no_ssh`, `deepspeed` over pdsh/ssh and `sbatch launch/slurm.sbatch`
logs the same losses as the same run on one node with 2 ranks. Where the launcher decides what a dead rank
does (torchrun, deepspeed --no_ssh, Slurm), one rank is killed mid-run: the job must fail within the
distributed timeout, and a rerun (a resubmitted or requeued Slurm job) resumes on the same losses.

Slurm holds a requeued job for two minutes before it may run again; the requeue is started by a fixture at
the module's start and checked by the module's last test, so the other tests run while Slurm holds it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from cluster import NODES, Cluster, unavailable_reason
from helpers import free_port, ok, read_metrics, run_cli

_reason = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.cluster,
              pytest.mark.skipif(_reason is not None, reason=f"two-node cluster: {_reason}")]

STEPS = 6
LONG_STEPS = 120  # long enough (~10 s) to be killed or requeued mid-run
LONG_CHECKPOINT_EVERY = 12
TIMEOUT_S = 20  # training.dist_timeout_s of the kill test
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    with c:
        yield c
    shutil.rmtree(c.root, ignore_errors=True)


def recipe(ws, tmp_path: Path, name: str, steps: int = STEPS, **training) -> str:
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    t = {"precision": "fp32", "max_steps": steps, "micro_batch_size": 2, "lr": 2e-2, "warmup_steps": 2, "seed": 7,
         "checkpoint_every": 3 if steps == STEPS else LONG_CHECKPOINT_EVERY, **training}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({
        "task": "causal_lm", "model": {"path": str(ws / "gpt2")},
        "data": {"train": str(ws / "lm.jsonl"), "max_length": 32, "packing": True, "eval_fraction": 0.0},
        "deepspeed": str(zero3), "training": t, "output_dir": str(tmp_path / name),
        "methods": [{"name": "lora", "r": 4, "target_modules": "all-linear"}]}))
    return str(path)


@pytest.fixture(scope="module")
def one_node(ws, built_ops, tmp_path_factory):
    """The reference: the same recipes on one node with 2 ranks."""
    tmp = tmp_path_factory.mktemp("one_node")
    ok(run_cli(["train", recipe(ws, tmp, "short")], nproc=2))
    ok(run_cli(["train", recipe(ws, tmp, "long", LONG_STEPS)], nproc=2))
    return {"short": read_metrics(tmp / "short"), "long": read_metrics(tmp / "long")}


@pytest.fixture(scope="module", autouse=True)
def requeued(cluster, ws, one_node, tmp_path_factory):
    """A long Slurm job, requeued (`scontrol requeue`) once it wrote a checkpoint: (job id, run dir). Slurm holds
    a requeued job for two minutes before it may start again (forcing an earlier start made the restarted
    batch script exit at once in some runs): made before the module's first test, the job waits out its hold
    while the other tests run, and the module's last test checks how it ended."""
    tmp = tmp_path_factory.mktemp("requeued")
    job = submit(cluster, recipe(ws, tmp, "run", LONG_STEPS))
    _wait_for_checkpoint(tmp / "run", LONG_CHECKPOINT_EVERY, [])
    ok(cluster.run("node1", "scontrol", "requeue", job))
    return job, tmp / "run"


def on_both(cluster: Cluster, argv_for_node) -> dict[str, subprocess.CompletedProcess]:
    """Start `argv_for_node(node, rank)` on both nodes at once; wait for both (killing both on timeout)."""
    procs = {node: cluster.popen(node, *argv_for_node(node, rank), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for rank, node in enumerate(NODES)}
    return {node: _finish(p, RUN_TIMEOUT_S) for node, p in procs.items()}


def _finish(p: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{p.args[-6:]} hung\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_matches_one_node(run_dir: Path, reference: dict, steps: int = STEPS) -> None:
    got = read_metrics(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step, row in reference.items():
        assert abs(row["loss"] - got[step]["loss"]) < 1e-5, (step, row["loss"], got[step]["loss"])
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2 and run["zero_stage"] == 3
    assert (run_dir / "checkpoints" / "last_complete").exists()
    assert (run_dir / "trainable.safetensors").exists()


def launch(*args: str) -> list[str]:
    return ["dstune", "launch", *args]


def test_nodes_are_separate_hosts(cluster):
    assert cluster.run("node1", "hostname").stdout.strip() == "node1"
    assert cluster.run("node1", "ssh", "node2", "hostname").stdout.strip() == "node2"
    assert cluster.run("node1", "sinfo", "-h", "-N", "-o", "%N %T").stdout.split() == ["node1", "idle",
                                                                                        "node2", "idle"]


def test_a_killed_test_run_leaves_no_cluster_behind():
    """The cluster's owner killed with SIGKILL (a test run's timeout): its watchdog kills the daemons and
    removes the namespaces."""
    import os
    import signal
    import sys

    owner = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cluster.py"))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = owner.stdout.readline()
        assert line.startswith("cluster up in "), (line, owner.stderr.read() if owner.poll() is not None else "")
        root = Path(line.split()[3].rstrip(";"))
        netns = [f"dsn{owner.pid}{i}" for i in (1, 2)]
        daemons = [int(p) for ns in netns for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                                  text=True).stdout.split()]
        daemons.append(int((root / "munge" / "munged.pid").read_text()))
        assert len(daemons) >= 6  # sshd ×2, slurmd ×2, slurmctld, munged
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    end = time.monotonic() + 30
    while time.monotonic() < end and (any(Path("/run/netns", ns).exists() for ns in netns)
                                      or any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                             for p in daemons)):
        time.sleep(0.5)
    assert not [ns for ns in netns if Path("/run/netns", ns).exists()]
    assert not [p for p in daemons if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    shutil.rmtree(root, ignore_errors=True)


def relative_recipe(ws, work: Path, rows: list[str]) -> str:
    """`recipe`'s short run, written in `work` with its data and run dir as relative paths: they resolve where
    the ranks run."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.jsonl").write_text("".join(rows))
    cfg = json.loads(Path(recipe(ws, work, "absolute")).read_text())
    cfg["data"]["train"], cfg["output_dir"] = "train.jsonl", "run"
    (work / "r.yaml").write_text(json.dumps(cfg))
    return "r.yaml"


def test_deepspeed_over_ssh_runs_in_the_callers_directory_and_nothing_injected_runs(cluster, ws, one_node,
                                                                                    tmp_path):
    """Run once on node1: pdsh starts a DeepSpeed launcher on each node over ssh, and the remote ranks `cd` to
    the caller's directory: a relative recipe trains like one node and writes its run dir there, not in
    $HOME. A directory, --master-addr or host name that a remote shell or ssh would run as a command is
    refused before anything starts, and runs nothing on either node."""
    home = Path(cluster.run("node2", "sh", "-c", "echo $HOME").stdout.strip())
    work = tmp_path / "work"
    r = relative_recipe(ws, work, (ws / "lm.jsonl").read_text().splitlines(keepends=True))
    port = str(free_port())
    dstune = launch("--launcher", "deepspeed", "--hosts", "node1,node2", "--procs-per-node", "1",
                    "--master-port", port)
    res = ok(cluster.run("node1", "sh", "-c", f"cd {work} && {' '.join(dstune)} {r}", timeout=RUN_TIMEOUT_S))
    assert "node2" in res.stdout + res.stderr  # pdsh prefixes remote output with the host name
    assert (work / "run" / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert_matches_one_node(work / "run", one_node["short"])
    assert not (home / "run").exists() and not (home / "train.jsonl").exists()

    hostile = {"space": (tmp_path / "a b", []), "subst": (tmp_path / "$(touch pwned)", []),
               "master": (tmp_path / "m", ["--master-addr", "127.0.0.1;touch pwned"]),
               "proxy": (tmp_path / "p", ["--hosts", "-oProxyCommand=touch pwned,node2"])}
    for name, (cwd, extra) in hostile.items():
        relative_recipe(ws, cwd, (ws / "lm.jsonl").read_text().splitlines(keepends=True))
        args = [*dstune[:4], *(extra if "--hosts" in extra else ["--hosts", "node1,node2", *extra]),
                "--procs-per-node", "1", "--master-port", port, r]
        res = cluster.run("node1", "sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(cwd), *args, timeout=60)
        assert res.returncode == 2 and res.stderr.count("dstune: error:") == 1, (name, res.stderr[-2000:])
        for where in (home, cwd, work, Path.cwd()):
            assert not (where / "pwned").exists(), (name, where)
        assert not (cwd / "run").exists(), name


def test_ranks_refusing_their_data_leave_no_run_dir(cluster, ws, tmp_path):
    """The ranks refuse a row without text (exit 2): the run dir that `dstune launch` made for the hostfile
    and the environment file goes again."""
    work = tmp_path / "work"
    rows = (ws / "lm.jsonl").read_text().splitlines(keepends=True)
    r = relative_recipe(ws, work, rows[:5] + ['{"text": null}\n'] + rows[5:])
    args = launch("--launcher", "deepspeed", "--hosts", "node1,node2", "--procs-per-node", "1", "--master-port",
                  str(free_port()), r)
    res = cluster.run("node1", "sh", "-c", f"cd {work} && {' '.join(args)}", timeout=RUN_TIMEOUT_S)
    assert res.returncode != 0
    assert "train.jsonl:6: data.text_column: 'text' is missing or null in this row" in res.stdout + res.stderr
    assert not (work / "run").exists(), sorted(p.name for p in (work / "run").iterdir())


def submit(cluster: Cluster, recipe_path: str) -> str:
    res = ok(cluster.run("node1", *launch("--launcher", "slurm", "--nodes", "2", "--procs-per-node", "1",
                                          recipe_path)))
    return re.search(r"Submitted batch job (\d+)", res.stdout).group(1)


def job_state(cluster: Cluster, job: str) -> str:
    out = cluster.run("node1", "scontrol", "show", "job", job, "-o").stdout
    return re.search(r"JobState=(\S+)", out).group(1)


def wait_job(cluster: Cluster, job: str, timeout: float = RUN_TIMEOUT_S) -> str:
    """Poll the controller (sbatch --wait polls at growing intervals, up to half a minute late)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = job_state(cluster, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    ok(cluster.run("node1", "scancel", job))
    raise AssertionError(f"job {job} still {state} after {timeout}s")


def _dstune_ranks(cluster: Cluster, node: str, recipe_path: str) -> list[psutil.Process]:
    """The processes on a node training `recipe_path` (not the launchers above them, nor another job's ranks)."""
    procs = []
    for pid in cluster.pids_on(node):
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        names = [Path(c).name for c in cmd]
        launcher = any(n in ("torchrun", "deepspeed") or "torch.distributed.run" in c or "deepspeed.launcher" in c
                       for n, c in zip(names, cmd))
        if "dstune" in names and "train" in cmd and recipe_path in cmd and not launcher:
            procs.append(psutil.Process(pid))
    return procs


def _wait_for_checkpoint(run_dir: Path, at_least: int, procs, timeout: float = RUN_TIMEOUT_S) -> int:
    pointer = run_dir / "checkpoints" / "last_complete"
    end = time.monotonic() + timeout
    while time.monotonic() < end and all(p.poll() is None for p in procs):
        if pointer.exists() and json.loads(pointer.read_text())["global_step"] >= at_least:
            return json.loads(pointer.read_text())["global_step"]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {at_least} in {run_dir}")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_train_fail_in_time_when_a_rank_dies_and_resume(cluster, ws, one_node, tmp_path, launcher):
    """One launcher per node (torchrun; deepspeed --no_ssh): the job trains like one node until the rank on
    node2 is SIGKILLed mid-run, fails on both nodes within the timeout, and a rerun resumes like one node."""
    r, port = recipe(ws, tmp_path, "run", LONG_STEPS, dist_timeout_s=TIMEOUT_S), str(free_port())
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    nodes = ["--hostfile", str(hostfile), "--no-ssh"] if launcher == "deepspeed" else ["--nodes", "2"]
    argv = lambda node, rank: launch("--launcher", launcher, *nodes, "--node-rank", str(rank),  # noqa: E731
                                     "--master-addr", NODES["node1"], "--master-port", port, r)
    procs = {node: cluster.popen(node, *argv(node, rank), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for rank, node in enumerate(NODES)}
    _wait_for_checkpoint(tmp_path / "run", LONG_CHECKPOINT_EVERY, procs.values())
    victims = _dstune_ranks(cluster, "node2", r)
    assert len(victims) == 1, victims
    victims[0].kill()
    killed = time.monotonic()
    results = {node: _finish(p, TIMEOUT_S + 60) for node, p in procs.items()}
    elapsed = time.monotonic() - killed
    for node, res in results.items():
        assert res.returncode != 0, f"{node} exited 0 after a rank died"
    assert elapsed < TIMEOUT_S + 30, f"the job took {elapsed:.0f}s to fail (timeout {TIMEOUT_S}s)"
    print(f"{launcher} job failed on both nodes {elapsed:.1f}s after the kill")
    step = json.loads((tmp_path / "run" / "checkpoints" / "last_complete").read_text())["global_step"]
    assert step < LONG_STEPS

    port = str(free_port())
    res = on_both(cluster, argv)
    for node in NODES:
        ok(res[node])
    assert f"resumed from step_{step:08d}" in res["node1"].stdout
    assert_matches_one_node(tmp_path / "run", one_node["long"], LONG_STEPS)  # the killed run's steps, then the rest


def test_slurm_two_nodes_fail_in_time_when_a_rank_dies_and_a_resubmitted_job_resumes(cluster, ws, one_node,
                                                                                     tmp_path):
    """`sbatch launch/slurm.sbatch` (srun, one rank per node, the rendezvous on node1's address) trains like one
    node until the rank on node2 is SIGKILLed; the job fails within the timeout, and a resubmitted job resumes."""
    r = recipe(ws, tmp_path, "run", LONG_STEPS, dist_timeout_s=TIMEOUT_S)
    job = submit(cluster, r)
    _wait_for_checkpoint(tmp_path / "run", LONG_CHECKPOINT_EVERY, [])
    victims = _dstune_ranks(cluster, "node2", r)
    assert len(victims) == 1, victims
    victims[0].kill()
    killed = time.monotonic()
    state = wait_job(cluster, job, TIMEOUT_S + 60)
    elapsed = time.monotonic() - killed
    assert state == "FAILED", state
    assert elapsed < TIMEOUT_S + 30, f"the job took {elapsed:.0f}s to fail (timeout {TIMEOUT_S}s)"
    print(f"Slurm job failed {elapsed:.1f}s after the kill")
    step = json.loads((tmp_path / "run" / "checkpoints" / "last_complete").read_text())["global_step"]

    job = submit(cluster, r)
    state = wait_job(cluster, job)
    log = (tmp_path / "run" / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"rendezvous {NODES['node1']}:" in log and f"resumed from step_{step:08d}" in log, log[-2000:]
    assert_matches_one_node(tmp_path / "run", one_node["long"], LONG_STEPS)


def test_requeued_slurm_job_resumes(cluster, one_node, requeued):
    """The job `requeued` put back in the queue at the module's start ran again and resumed."""
    job, run_dir = requeued
    state = wait_job(cluster, job, RUN_TIMEOUT_S + 120)
    log = (run_dir / f"slurm-{job}.out").read_text()
    shown = cluster.run("node1", "scontrol", "show", "job", job).stdout  # Restarts, Reason, ExitCode
    assert state == "COMPLETED", shown + log[-3000:]
    assert "(restart 1)" in log
    step = int(re.search(r"resumed from step_(\d+)", log).group(1))
    assert 0 < step < LONG_STEPS
    assert_matches_one_node(run_dir, one_node["long"], LONG_STEPS)
