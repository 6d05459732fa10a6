"""Build dstune's native extensions: JIT on first use (cached in TORCH_EXTENSIONS_DIR), or ahead of
time with `dstune kernels build` (e.g. while building a cluster image, so jobs never compile).

Every source in csrc/ is a .cu file for sm_80 (A100) and sm_90 (H100/H200). The JIT build compiles for
the GPU present (or TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0" for an image that serves both); `nvcc_check`
compiles for both without a GPU, which is what CI does.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
ARCHS = ("80", "90")
# extension name -> its sources in csrc/
EXTENSIONS = {
    "dstune_memory_sampler": ["memory_sampler.cu"],
    "dstune_prefix_attention": ["prefix_attention.cu"],
}


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
    """Compile one .cu to an object file for every target arch; no GPU needed."""
    from torch.utils.cpp_extension import include_paths
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-Xcompiler", "-fPIC", f"-DTORCH_EXTENSION_NAME={source.stem}",
           *includes, *gencode_flags(), str(source), "-o", str(out_dir / f"{source.stem}.o")]
    return subprocess.run(cmd, capture_output=True, text=True)
