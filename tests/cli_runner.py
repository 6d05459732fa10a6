"""Running the real `dstune` command line from tests, three ways:

- in this process (`in_process`): `dstune.cli.main(args)` with stdout and stderr captured at the file
  descriptors, the environment and working directory restored afterwards: no interpreter start and no
  `import torch, deepspeed` per call;
- as ranks of a reused worker pool (`RankPool`): one process per rank, started once per world size for the
  whole session (DeepSpeed's own test suite reuses workers the same way); each call sets RANK/WORLD_SIZE and
  a fresh MASTER_PORT, runs `main(args)` in every worker and tears the process group down after;
- under a real launcher, in a subprocess (`in_subprocess`): torchrun, DeepSpeed's launcher, or plain
  `python -m dstune`, for the tests whose point is the launcher, a signal, or a separate process.

All three return a `CliResult` with the exit code and the captured text, like subprocess.CompletedProcess.
"""
from __future__ import annotations

import contextlib
import gc
import io
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

LAUNCH_TIMEOUT_S = 420
FAILED_RANK_GRACE_S = 5  # after one rank fails, the others' time to end before the pool is killed


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    ranks: list[tuple[str, str]] = field(default_factory=list)  # (stdout, stderr) of each rank of a pooled run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts ranks in their own sessions)."""
    import psutil
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for p in parent.children(recursive=True) + [parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def _captured_output():
    """Everything this process writes to stdout and stderr, at the file descriptors (C++ libraries included)
    and through sys.stdout/sys.stderr, goes to two temporary files; yields a dict that holds their text
    ("out", "err") once the block ends."""
    text: dict[str, str] = {}
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_streams = [os.dup(1), os.dup(2)], (sys.stdout, sys.stderr, sys.stdin)
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", errors="replace", write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), encoding="utf-8", errors="replace", write_through=True)
    try:
        yield text
    finally:
        captured = (sys.stdout, sys.stderr)
        for stream in captured:
            stream.flush()
            stream.close()
        sys.stdout, sys.stderr, sys.stdin = saved_streams
        # a library that set up its log handler during the run (datasets, transformers) holds the closed
        # stream: point it back at the real stderr, or its next message is a logging error in a later run
        loggers = [logging.getLogger(), *(x for x in logging.root.manager.loggerDict.values()
                                         if isinstance(x, logging.Logger))]
        for handler in (h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)):
            if handler.stream in captured:
                handler.stream = sys.stderr  # setStream would flush the closed one
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        for key, f in zip(("out", "err"), files):
            f.seek(0)
            text[key] = f.read().decode("utf-8", errors="replace")
            f.close()


def _call_main(args: list[str], cwd: Path | None, env: dict | None, input: str | None) -> tuple[int, str, str]:
    """`dstune.cli.main(args)` here, as the console script would run it: (exit code, stdout, stderr). An
    uncaught exception is exit code 1 with its traceback on stderr, as in a process."""
    import dstune.cli

    environ, workdir, path = dict(os.environ), os.getcwd(), list(sys.path)
    os.environ.update(env or {})
    # a new process would start with PYTHONPATH's folders first (where a plugin's entry points are found)
    sys.path[:0] = [p for p in (env or {}).get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd is not None:
        os.chdir(cwd)
    try:
        with _captured_output() as text:
            if input is not None:
                sys.stdin = io.StringIO(input)
            try:
                code = dstune.cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse's own errors
                code = e.code if isinstance(e.code, int) else 1
            except Exception:  # noqa: BLE001 - a traceback, as a process would print it
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        _release_process_group()
        gc.collect()
    return code, text["out"], text["err"]


def _release_process_group() -> None:
    """A command that failed half-way may leave its process group (and DeepSpeed's groups made from it, and
    transformers' ZeRO-3 loading switch) behind: the next call starts clean."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dstune.engine.distributed import shutdown
    shutdown()
    unset_hf_deepspeed_config()


def in_process(args: list[str], cwd: Path | None = None, env: dict | None = None,
               input: str | None = None) -> CliResult:
    code, out, err = _call_main(args, cwd, env, input)
    return CliResult(list(args), code, out, err)


def _serve(rank: int, world: int, conn) -> None:
    """A pool worker: one rank of every job the pool runs, until it is sent None."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    import deepspeed  # noqa: F401 - paid once per worker, not per job
    import dstune.cli  # noqa: F401
    while (job := conn.recv()) is not None:
        args, cwd, env, port = job
        conn.send(_call_main(args, cwd, {**(env or {}), "MASTER_PORT": str(port)}, None))


class RankPool:
    """`world` worker processes, each one rank of the jobs it is given; reused from job to job."""

    def __init__(self, world: int):
        ctx = multiprocessing.get_context("spawn")
        self.world, self.conns, self.procs, self.closed = world, [], [], False
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world, theirs), daemon=True, name=f"dstune-rank{rank}")
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)

    def alive(self) -> bool:
        return not self.closed and all(p.is_alive() for p in self.procs)

    def run(self, args: list[str], cwd: Path | None, env: dict | None, timeout: float) -> CliResult:
        """Every worker runs `dstune ARGS` as its rank. As under a launcher, a rank that fails ends the job: the
        ranks still running get `FAILED_RANK_GRACE_S` to end too, then the pool is killed (and restarted at
        its next use)."""
        port = free_port()
        for conn in self.conns:
            conn.send(([str(a) for a in args], cwd, env, port))
        results: dict[int, tuple[int, str, str]] = {}
        deadline = time.monotonic() + timeout
        while len(results) < self.world:
            failed = any(code != 0 for code, _, _ in results.values())
            if time.monotonic() > deadline:
                self.close()
                if not failed:
                    raise AssertionError(f"dstune {' '.join(map(str, args))}: the pool's ranks hung for {timeout:.0f} s"
                                         + "".join(f"\nrank {r}:\n{o[-2000:]}\n{e[-3000:]}"
                                                   for r, (_, o, e) in sorted(results.items())))
                for rank in range(self.world):  # killed by the "launcher", as torchrun kills its other ranks
                    results.setdefault(rank, (-9, "", ""))
                break
            for rank, conn in enumerate(self.conns):
                if rank not in results and conn.poll(0.05):
                    try:
                        results[rank] = conn.recv()
                    except EOFError:
                        self.close()
                        raise AssertionError(f"dstune {' '.join(map(str, args))}: rank {rank} of the pool "
                                             "died") from None
                    if results[rank][0] != 0:
                        deadline = min(deadline, time.monotonic() + FAILED_RANK_GRACE_S)
        ordered = [results[r] for r in range(self.world)]
        code = next((c for c, _, _ in ordered if c != 0), 0)
        return CliResult(list(args), code, "".join(o for _, o, _ in ordered), "".join(e for _, _, e in ordered),
                         [(o, e) for _, o, e in ordered])

    def close(self) -> None:
        """Idle ranks leave when told; a rank still in a job (hung, stopped) is killed after a second."""
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        self.closed = True
        deadline = time.monotonic() + 1
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                kill_tree(proc.pid)
                proc.join(timeout=5)


_POOLS: dict[int, RankPool] = {}


def pooled(args: list[str], world: int, cwd: Path | None = None, env: dict | None = None,
           timeout: float = LAUNCH_TIMEOUT_S) -> CliResult:
    """Run `dstune ARGS` as `world` ranks of the session's pool for that world size (started on first use)."""
    pool_pids(world)
    return _POOLS[world].run(args, cwd, env, timeout)


def pool_pids(world: int) -> list[int]:
    """The process ids of the session pool's ranks for `world` (started if need be), in rank order."""
    pool = _POOLS.get(world)
    if pool is None or not pool.alive():
        pool = _POOLS[world] = RankPool(world)
    return [proc.pid for proc in pool.procs]


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def in_subprocess(args: list[str], nproc: int = 1, launcher: str = "python", cwd: Path | None = None,
                  timeout: int = LAUNCH_TIMEOUT_S, env: dict | None = None, command: list[str] | None = None,
                  input: str | None = None) -> CliResult:
    """Run `dstune ARGS` in a new process: `python -m dstune` (or `command`), or `nproc` ranks under torchrun or
    the `deepspeed` launcher; `input` on its stdin; the whole process tree is killed on timeout."""
    if launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--module", "dstune", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "dstune", *args]
    else:
        cmd = [*(command or [sys.executable, "-m", "dstune"]), *args]
    e = {**os.environ, **(env or {})}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            stdin=subprocess.PIPE if input is not None else None)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"dstune {' '.join(map(str, args))} hung for {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    return CliResult(list(args), proc.returncode, out, err)
