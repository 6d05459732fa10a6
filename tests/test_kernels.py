"""Native extensions: every .cu in dstune/kernels/csrc compiles with nvcc for sm_80 and sm_90 (no GPU
needed); on a GPU, the memory sampler sees allocations the caching allocator makes."""
from __future__ import annotations

import shutil

import pytest
import torch

from dstune.kernels.build import ARCHS, CSRC, EXTENSIONS, nvcc_check

SOURCES = sorted(CSRC.glob("*.cu"))


def test_every_source_belongs_to_an_extension():
    listed = {s for sources in EXTENSIONS.values() for s in sources}
    assert {p.name for p in SOURCES} == listed


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_source_compiles_for_sm80_and_sm90(source, tmp_path):
    res = nvcc_check(source, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    obj = (tmp_path / f"{source.stem}.o").read_bytes()
    for arch in ARCHS:  # both architectures' machine code is in the object
        assert f"sm_{arch}".encode() in obj


def test_phase_memory_on_cpu_says_what_it_measured():
    from dstune.telemetry.phases import PHASES, PhaseMemory
    mem = PhaseMemory(torch.device("cpu"))
    for phase in PHASES:
        mem.mark(phase)
    report = mem.report()
    assert "RSS" in report["measured_by"] and "no CUDA" in report["measured_by"]
    assert set(report["rss"]) == set(PHASES) and all(v > 0 for v in report["rss"].values())
    assert report["peak_rss"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_sees_a_device_allocation():
    from dstune.kernels.build import load
    sampler = load("dstune_memory_sampler").MemorySampler(0, 50)
    sampler.start()
    base = sampler.last()
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    import time
    time.sleep(0.05)
    sampler.stop()
    assert sampler.error() == ""
    assert sampler.samples() > 1
    assert sampler.peak() - base >= 256 * 2**20
    del x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_phase_memory_on_gpu_reports_each_phase():
    from dstune.telemetry.phases import PHASES, PhaseMemory
    mem = PhaseMemory(torch.device("cuda", 0), device_sampler=True)   # training.measure_memory: device
    for i, phase in enumerate(PHASES):
        x = torch.empty((i + 1) * 2**20, dtype=torch.uint8, device="cuda")
        mem.mark(phase)
        del x
    report = mem.report()
    mem.close()
    for i, phase in enumerate(PHASES):
        assert report["allocator_peak"][phase] >= (i + 1) * 2**20
    assert report["device_peak"] is not None, report["measured_by"]
    cheap = PhaseMemory(torch.device("cuda", 0))   # the default: no sampler, no extension build
    cheap.mark("init")
    assert cheap.sampler is None and "measure_memory: device" in cheap.report()["measured_by"]


@pytest.mark.slow
def test_a_build_lock_left_by_a_killed_build_is_cleared(ws, built_ops, tmp_path):
    """torch waits forever on the `lock` file of a build that was killed; dstune's runs find it stale (no
    process holds the build's OS lock) and remove it, and the op loads from the cache. Two new processes
    (ranks under torchrun): a process that loaded the op before never looks at the build folder again."""
    import os

    from helpers import lm_recipe, ok, run_cli

    cache = tmp_path / "ext"
    shutil.copytree(os.environ["TORCH_EXTENSIONS_DIR"], cache, symlinks=True)
    stale = cache / "deepspeed_shm_comm" / "lock"
    stale.write_text("")
    recipe = lm_recipe(ws, tmp_path, "run", max_steps=2)
    res = ok(run_cli(["train", recipe], nproc=2, launcher="torchrun", env={"TORCH_EXTENSIONS_DIR": str(cache)},
                     timeout=300))
    assert f"removing {stale}, left by a build that was killed" in res.stdout
    assert not stale.exists()
