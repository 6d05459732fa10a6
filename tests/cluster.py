"""Two real nodes on one machine, with sshd on each and a real Slurm cluster across them.

Each node is a network namespace, joined to the other by a veth pair; a command "on" a node runs in
that namespace with its own hostname and an /etc/hosts naming both nodes (gloo advertises the address
its hostname resolves to). munged serves both nodes over a unix socket; sshd and slurmd run on each
node, slurmctld on node1. Everything started here is killed by PID in `stop()`.

Needs root and Debian's packages (installed with apt-get when missing). `python tests/cluster.py`
stands the cluster up, prints how to use it and waits for Ctrl-C.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge",
            "pdsh": "pdsh", "sshd": "openssh-server"}
NODES = {"node1": "10.77.0.1", "node2": "10.77.0.2"}


def unavailable_reason() -> str | None:
    """Why this machine cannot host the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, Slurm daemons)"
    for tool in ("ip", "nsenter", "unshare"):
        if not shutil.which(tool):
            return f"needs `{tool}`"
    if not all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in PACKAGES) and not shutil.which("apt-get"):
        return "Slurm/munge/pdsh/sshd are missing and apt-get is not available to install them"
    return None


def install_packages() -> None:
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if not (shutil.which(tool) or Path("/usr/sbin", tool).exists())})
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Cluster:
    """`with Cluster() as c:` starts everything; `c.on(node, *argv)` is the argv that runs on a node."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="dstune-cluster-"))
        tag = str(os.getpid())
        self.netns = {n: f"dsn{tag}{i}" for i, n in enumerate(NODES, 1)}
        self.veth = [f"dsv{tag}{i}" for i in (1, 2)]
        self.daemons: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.home_ssh = Path(pwd.getpwuid(0).pw_dir) / ".ssh"

    # ---- running things on a node --------------------------------------------------------------
    def on(self, node: str, *argv: str) -> list[str]:
        script = ('mount --bind "$1" /etc/hosts && mount --bind "$2" "$3" && hostname "$4" && shift 4 '
                  '&& exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts", "--mount", "sh", "-c",
                script, "on-node", str(self.root / "hosts"), str(self.root / "ssh" / "client"),
                str(self.home_ssh), node, *argv]

    def run(self, node: str, *argv: str, timeout: int = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.on(node, *argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env, **(env or {})})

    def popen(self, node: str, *argv: str, env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.on(node, *argv), env={**os.environ, **self.env, **(env or {})},
                                start_new_session=True, **kw)

    # ---- bring-up ----------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        install_packages()
        self._watchdog()
        self._network()
        self._ssh()
        self._munge()
        self._slurm()

    def _network(self) -> None:
        (self.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in NODES.items()))
        a, b = self.veth
        _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for (node, addr), dev in zip(NODES.items(), self.veth):
            ns = self.netns[node]
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", dev, "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _ssh(self) -> None:
        """Passwordless root ssh between the nodes; the node's ~/.ssh is this cluster's folder."""
        self.home_ssh.mkdir(mode=0o700, exist_ok=True)
        d = self.root / "ssh"
        (d / "client").mkdir(parents=True)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client" / "id_ed25519"))
        (d / "client" / "authorized_keys").write_text((d / "client" / "id_ed25519.pub").read_text())
        (d / "client" / "config").write_text(
            "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        for node in NODES:
            cfg = self.root / f"sshd.{node}.conf"
            cfg.write_text(f"HostKey {d / 'host_key'}\nPidFile {self.root / f'sshd.{node}.pid'}\n"
                           "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n"
                           "UsePAM no\nAuthorizedKeysFile .ssh/authorized_keys\n")
            self._daemon(node, shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(cfg))

    def _munge(self) -> None:
        m = self.root / "munge"
        m.mkdir(mode=0o755)
        _sh("mungekey", "-c", "-k", str(m / "munge.key"))
        self.munge_socket = m / "munge.socket"
        argv = ["munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}",
                f"--log-file={m / 'munged.log'}", f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'seed'}"]
        self.daemons.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True))
        _wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket")

    def _slurm(self) -> None:
        r = self.root
        for sub in ("state", "spool", "tmp"):
            (r / sub).mkdir()
        nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN\n"
                        for n, a in NODES.items())
        self.conf.write_text(f"""ClusterName=dstune
SlurmctldHost=node1({NODES['node1']})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
TmpFS={r / 'tmp'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd'}.%n.pid
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd'}.%n.log
{nodes}PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon("node1", "slurmctld", "-D", "-c", "-f", str(self.conf))
        for node in NODES:
            self._daemon(node, "slurmd", "-D", "-f", str(self.conf))
        _wait(lambda: self.run("node1", "sinfo", "-h", "-N", "-o", "%T").stdout.split() == ["idle", "idle"], 60,
              "Slurm nodes did not become idle (see slurmctld.log / slurmd.*.log in " + str(r) + ")")

    def _daemon(self, node: str, *argv: str) -> None:
        log = open(self.root / f"{Path(argv[0]).name}.{node}.out", "w")
        self.daemons.append(self.popen(node, *argv, stdout=log, stderr=subprocess.STDOUT))

    # ---- teardown ----------------------------------------------------------------------------
    def pids_on(self, node: str) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", self.netns[node]], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split()]

    def _watchdog(self) -> None:
        """A process whose only job is to tear the cluster down once this one ends, however it ends (a
        test run killed for its timeout included): it waits for EOF on a pipe whose only writer is this
        process, and the kernel closes that when the process dies."""
        read, self._alive = os.pipe()  # neither end is inherited by what this process starts later
        self.reaper = subprocess.Popen([sys.executable, __file__, "--teardown", *self._parts()], stdin=read,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(read)

    def _parts(self) -> list[str]:
        return [*self.netns.values(), self.veth[0], str(self.root / "munge" / "munged.pid")]

    def stop(self) -> None:
        """Kill every process on the nodes (jobs, sshd sessions, daemons), then munged; remove the namespaces."""
        teardown(*self._parts())
        for p in self.daemons:
            _kill(p.pid)
            p.wait(timeout=30)
        if getattr(self, "reaper", None):
            os.close(self._alive)  # nothing left for it to do
            self.reaper.wait(timeout=30)
            self.reaper = None


def teardown(netns1: str, netns2: str, veth: str, munged_pidfile: str) -> None:
    """Kill every process in the nodes' namespaces and munged, remove the namespaces and the veth pair;
    what is already gone is skipped."""
    for ns in (netns1, netns2):
        if Path("/run/netns", ns).exists():
            res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in res.stdout.split():
                _kill(int(pid))
    try:
        _kill(int(Path(munged_pidfile).read_text().strip()))
    except (OSError, ValueError):
        pass
    for ns in (netns1, netns2):
        if Path("/run/netns", ns).exists():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", veth], capture_output=True)  # only if never moved


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(ready, timeout_s: float, message: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(message)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--teardown"]:  # the watchdog: wait for the cluster's owner to end, then clean up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdin.buffer.read()
        teardown(*sys.argv[2:])
        sys.exit(0)
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot stand up the cluster: {reason}")
    import shlex

    def _stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background, where SIGINT is ignored
    with Cluster() as c:
        print(f"cluster up in {c.root}; SLURM_CONF={c.conf}", flush=True)
        print("a shell on node1:", shlex.join(c.on("node1", "bash")), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
