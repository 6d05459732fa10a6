"""`dstune launch`: check a multi-node launch before anything starts, then hand it to the real launcher.

The launch commands live in launch/*.sh and launch/slurm.sbatch, readable and runnable without dstune;
this module validates the recipe, hostfile and node counts, writes the hostfile (and the environment
file DeepSpeed forwards over ssh), and runs the script with its settings as environment variables.
Arguments travel as argv lists, never through a local shell.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dstune.rundir.lock import ENV_FILE, HOSTFILE
from dstune.errors import UserError

# package data; the top-level launch/ is a link to it, so the scripts also run on their own from a checkout
LAUNCH_DIR = Path(__file__).resolve().parent / "launchers"
LAUNCHERS = ("deepspeed", "torchrun", "slurm")
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")
# pdsh hands the ranks' arguments to a remote shell; these characters pass one unchanged
SHELL_SAFE = re.compile(r"^[\w@%+=:,./-]*$")
# a host name or address (never an option: ssh, pdsh and DeepSpeed's reachability check take a leading -
# as one); IPv6 addresses are hex and colons
HOST = re.compile(r"^(?:[A-Za-z0-9_][\w.-]*|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*)$")
HOST_RULE = "host names are letters, digits, '.', '-' and '_', not starting with '-' (or an IP address)"
# what the ranks on other nodes need from this environment when DeepSpeed starts them over ssh
FORWARD_PREFIXES = ("PATH", "VIRTUAL_ENV", "DS_", "OMP_", "TORCH_", "HF_", "GLOO_", "NCCL_", "CUDA_HOME", "TOKENIZERS_", "DSTUNE_")


def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """Read a DeepSpeed hostfile ("HOST slots=N" per line, # comments) into {host: slots}."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read hostfile ({e.strerror})") from None
    hosts: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = HOSTFILE_LINE.match(line)
        if not m:
            raise UserError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = m.group(1), int(m.group(2))
        if not HOST.match(host):
            raise UserError(f"{path}:{number}: {host!r} is not a host name; {HOST_RULE}")
        if slots == 0:
            raise UserError(f"{path}:{number}: {host} has slots=0; give each node at least one slot")
        if host in hosts:
            raise UserError(f"{path}:{number}: {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"{path}: the hostfile lists no hosts")
    return hosts


def format_hostfile(hosts: dict[str, int]) -> str:
    return "".join(f"{h} slots={n}\n" for h, n in hosts.items())


@dataclass
class Plan:
    """What a launch runs: argv (through one of launch/'s scripts or sbatch) with env, after writing files."""
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)
    via_script: bool = True
    make_dirs: list[Path] = field(default_factory=list)


def _gpus_here() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _node_pool(launcher: str, hostfile: str | None, hosts: list[str] | None, nodes: int | None,
               procs_per_node: int | None, run_dir: Path, files: dict[Path, str]):
    """The nodes a hostfile or --hosts names, checked against --nodes and --procs-per-node.

    Returns (pool {host: slots}, the hostfile the launcher reads (written into `files` for --hosts),
    nodes, processes per node).
    """
    if hostfile:
        pool = parse_hostfile(hostfile)
        hostfile = str(Path(hostfile).resolve())
    else:
        names = [h.strip() for h in hosts if h.strip()]
        if not names:
            raise UserError("--hosts: no host names given")
        if len(set(names)) != len(names):
            raise UserError(f"--hosts: a host is listed twice in {','.join(names)}")
        bad = [h for h in names if not HOST.match(h)]
        if bad:
            raise UserError(f"--hosts: {bad[0]!r} is not a host name; {HOST_RULE}")
        pool = {h: procs_per_node or _gpus_here() or 1 for h in names}
        if launcher != "slurm":  # Slurm takes the names as --nodelist
            hostfile = str(run_dir / HOSTFILE)
            files[Path(hostfile)] = format_hostfile(pool)
    where = "--hosts" if hosts else hostfile
    if nodes is not None and nodes != len(pool):
        raise UserError(f"--nodes {nodes} does not match the {len(pool)} host(s) in {where}")
    slots = set(pool.values())
    if procs_per_node is None:
        if len(slots) > 1 and launcher != "deepspeed":
            raise UserError(f"{where}: {launcher} runs the same number of processes on every node; "
                            f"slots differ ({', '.join(f'{h}={n}' for h, n in pool.items())})")
        procs_per_node = max(slots)
    elif launcher == "deepspeed" and slots != {procs_per_node}:
        raise UserError(f"--procs-per-node {procs_per_node} does not match the slots in {where}")
    return pool, hostfile, len(pool), procs_per_node


def plan_launch(launcher: str, recipe: str, overrides: list[str], output_dir: str, dist_timeout_s: int, *,
                nodes: int | None = None, procs_per_node: int | None = None, hostfile: str | None = None,
                hosts: list[str] | None = None, node_rank: int | None = None, master_addr: str | None = None,
                master_port: int = 29500, no_ssh: bool = False, sbatch_args: list[str] | None = None) -> Plan:
    """Check a launch and say what to run. Every mistake is a UserError naming the option or file:line."""
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if hostfile and hosts:
        raise UserError("--hostfile and --hosts: give one of them")
    if procs_per_node is not None and procs_per_node < 1:
        raise UserError(f"--procs-per-node: must be at least 1, got {procs_per_node}")
    if nodes is not None and nodes < 1:
        raise UserError(f"--nodes: must be at least 1, got {nodes}")
    if not 0 < master_port < 65536:
        raise UserError(f"--master-port: {master_port} is not a TCP port")
    if master_addr is not None and not HOST.match(master_addr):
        raise UserError(f"--master-addr: {master_addr!r} is not a host name or address; {HOST_RULE}")

    run_dir = Path(output_dir).resolve()
    files: dict[Path, str] = {}
    pool = None
    if hostfile or hosts:
        pool, hostfile, nodes, procs_per_node = _node_pool(launcher, hostfile, hosts, nodes, procs_per_node,
                                                           run_dir, files)
    nodes = nodes or 1
    procs = procs_per_node or _gpus_here() or 1
    user_args = [str(Path(recipe).resolve()), *overrides]

    if node_rank is not None and not 0 <= node_rank < nodes:
        raise UserError(f"--node-rank {node_rank}: must be in 0..{nodes - 1} for {nodes} node(s)")
    first = next(iter(pool)) if pool else None
    addr = master_addr or first or ("127.0.0.1" if nodes == 1 else None)

    if launcher == "slurm":
        if hostfile and not hosts:
            raise UserError("--hostfile: Slurm picks the nodes; use --nodes (and --hosts for a nodelist)")
        argv = ["sbatch", f"--nodes={nodes}", f"--ntasks-per-node={procs}", f"--job-name=dstune-{run_dir.name}",
                f"--output={run_dir / 'slurm-%j.out'}"]
        if hosts:
            argv.append(f"--nodelist={','.join(pool)}")
        argv += [*(sbatch_args or []), str(LAUNCH_DIR / "slurm.sbatch"), *user_args]
        return Plan(argv, {}, files, via_script=False, make_dirs=[run_dir])  # sbatch writes its log there

    if launcher == "deepspeed" and nodes > 1 and pool is None:
        raise UserError("--hostfile: DeepSpeed needs a hostfile (or --hosts) for more than one node")
    env = {"PROCS_PER_NODE": str(procs), "MASTER_PORT": str(master_port), "RDZV_TIMEOUT": str(dist_timeout_s)}
    if nodes > 1:
        if addr is None:
            raise UserError("--master-addr: needed with --nodes > 1 (the address of node 0)")
        env["MASTER_ADDR"] = addr
    if launcher == "torchrun":
        if nodes > 1 and node_rank is None:
            raise UserError("--node-rank: torchrun runs on every node; say which one this is (0..N-1)")
        env.update(NNODES=str(nodes), NODE_RANK=str(node_rank or 0))
        return Plan(["bash", str(LAUNCH_DIR / "torchrun.sh"), *user_args], env, files)

    # deepspeed
    if pool is not None:
        env["HOSTFILE"] = hostfile
        env.setdefault("MASTER_ADDR", addr)
        if no_ssh:
            if node_rank is None:
                raise UserError("--node-rank: with --no-ssh a launcher runs on every node; say which one (0..N-1)")
            env.update(NO_SSH="1", NODE_RANK=str(node_rank))
        else:
            if not SHELL_SAFE.match(os.getcwd()):
                raise UserError(f"{os.getcwd()!r}: DeepSpeed starts the other nodes' ranks with `cd` to this "
                                "directory in a remote shell; run from a directory whose path has no spaces, "
                                "quotes or shell characters")
            unsafe = [a for a in user_args if not SHELL_SAFE.match(a)]
            if unsafe:
                raise UserError(f"{unsafe[0]!r}: DeepSpeed passes arguments to the other nodes through a remote "
                                "shell; use paths and values without spaces or quotes, or put them in the recipe")
            env_file = run_dir / ENV_FILE
            files[env_file] = "".join(f"{k}={v}\n" for k, v in sorted(os.environ.items())
                                      if k.startswith(FORWARD_PREFIXES) and SHELL_SAFE.match(v))
            env["DS_ENV_FILE"] = str(env_file)
    return Plan(["bash", str(LAUNCH_DIR / "deepspeed.sh"), *user_args], env, files)


def launch_command(plan: Plan) -> str:
    """The real launcher's command line, as the script would run it."""
    if not plan.via_script:
        return shlex.join(plan.argv)
    res = subprocess.run(plan.argv, env={**os.environ, **plan.env, "DRY_RUN": "1"}, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise UserError(f"{plan.argv[1]}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'failed'}")
    return res.stdout.strip()


def describe(plan: Plan) -> str:
    """--dry-run output: files it would write, the settings it passes, and the exact command."""
    out = []
    for path, text in plan.files.items():
        out.append(f"# writes {path}:")
        out += [f"#   {line}" for line in text.splitlines()]
    if plan.env:
        out.append("# with " + " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items()))
    out.append(launch_command(plan))
    return "\n".join(out)


def execute(plan: Plan) -> None:
    """Write the plan's files, then become the launcher (signals reach it directly)."""
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in plan.make_dirs:
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **plan.env}
    try:
        os.execvpe(plan.argv[0], plan.argv, env)
    except FileNotFoundError:
        raise UserError(f"--launcher: `{plan.argv[0]}` is not installed here") from None
