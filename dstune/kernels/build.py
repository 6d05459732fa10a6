"""Build dstune's native extensions: JIT on first use (cached in TORCH_EXTENSIONS_DIR), or ahead of
time with `dstune kernels build` (e.g. while building a cluster image, so jobs never compile).

Every source in csrc/ is a .cu file for sm_80 (A100) and sm_90 (H100/H200). The JIT build compiles for
the GPU present (or TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0" for an image that serves both); `nvcc_check`
compiles for both without a GPU, which is what CI does.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
ARCHS = ("80", "90")
# extension name -> its sources in csrc/
EXTENSIONS = {
    "dstune_memory_sampler": ["memory_sampler.cu"],
    "dstune_prefix_attention": ["prefix_attention.cu"],
}


BUILD_TIMEOUT_S = 1800  # how long a process waits for another's build of the same extension, by default


def guard_jit_builds(timeout_s: float = BUILD_TIMEOUT_S) -> None:
    """Make every JIT build of a torch extension (DeepSpeed's ops and dstune's) safe against killed builders.

    torch marks a build folder with a `lock` file while it compiles and makes every other process wait
    while the file exists; a builder killed half-way leaves it, and every later run waits forever. Here a
    build also holds an OS lock (flock, released by the kernel when its holder dies, however it dies): the
    process holding it while a `lock` file exists knows no one is building and removes the file. Waiting
    for another process's build ends after `timeout_s` with an error naming the folder."""
    import torch.utils.cpp_extension as ext

    original = getattr(ext.load, "__wrapped__", ext.load)

    @functools.wraps(original)
    def load(name, *args, **kwargs):
        folder = kwargs.get("build_directory") or ext._get_build_directory(name, False)
        with build_lock(folder, timeout_s):
            return original(name, *args, **kwargs)

    ext.load = load


@contextlib.contextmanager
def build_lock(folder: str, timeout_s: float) -> Iterator[None]:
    """Hold `folder`'s build lock (waiting at most `timeout_s`), clearing a `lock` file a killed build left."""
    from dstune.errors import UserError

    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, "dstune.flock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"training.build_timeout_s: another process has been building {folder} for "
                                    f"over {timeout_s:.0f} s; wait for it, or stop it and rerun") from None
                time.sleep(0.5)
        stale = os.path.join(folder, "lock")
        if os.path.exists(stale):
            log.warning("removing %s, left by a build that was killed", stale)
            print(f"[dstune] removing {stale}, left by a build that was killed", flush=True)
            os.unlink(stale)
        yield
    finally:
        os.close(fd)  # releases the flock


def gencode_flags() -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]


def unavailable_reason() -> str | None:
    """Why extensions cannot be built or run here (None when they can)."""
    import torch
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


@functools.cache
def load(name: str):
    """The compiled extension `name` (built on first use, then cached); raises RuntimeError if it cannot be."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"{name}: {reason}")
    import torch.utils.cpp_extension as ext
    if not hasattr(ext.load, "__wrapped__"):  # not guarded yet (a run guards with training.build_timeout_s)
        guard_jit_builds()
    from torch.utils.cpp_extension import load as jit_load
    log.debug("loading extension %s (JIT build if not cached)", name)
    return jit_load(name=name, sources=[str(CSRC / s) for s in EXTENSIONS[name]],
                    extra_cuda_cflags=["-O3", "-std=c++17"], verbose=False)


def build_all() -> list[str]:
    """Ahead-of-time build of every extension into the JIT cache; returns their names."""
    for name in EXTENSIONS:
        load(name)
    return list(EXTENSIONS)


def nvcc_check(source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    """Compile one .cu to an object file for every target arch (the arches in parallel); no GPU needed."""
    from torch.utils.cpp_extension import include_paths
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    cmd = [nvcc, "-c", "--threads", "0", "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
           f"-DTORCH_EXTENSION_NAME={source.stem}",
           *includes, *gencode_flags(), str(source), "-o", str(out_dir / f"{source.stem}.o")]
    return subprocess.run(cmd, capture_output=True, text=True)
