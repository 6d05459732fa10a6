"""Peak memory per training phase (init, forward, backward, optimizer step), by every view we have.

- CUDA: the caching allocator's peak, reset at each phase boundary (host-side counters: exact per phase
  without synchronising); the native sampler's device-level peak (cudaMemGetInfo in a background thread,
  so it also sees the CUDA context, NCCL, cuBLAS workspaces and DeepSpeed buffers); pynvml's view of this
  process.
- CPU: the process RSS at the end of each phase (psutil) and the process's peak RSS (getrusage).

`report()` says which of these measured.
"""
from __future__ import annotations

import logging
import resource

import psutil
import torch

log = logging.getLogger(__name__)

PHASES = ("init", "forward", "backward", "step")


class DeviceSampler:
    """The native cudaMemGetInfo sampler, or None-valued stand-in with the reason it is unavailable."""

    def __init__(self, device: torch.device, interval_us: int = 100):
        self.native = None
        self.reason = None
        try:
            from dstune.kernels.build import load
            self.native = load("dstune_memory_sampler").MemorySampler(device.index or 0, interval_us)
            self.native.start()
        except Exception as e:  # no CUDA, no nvcc, or a failed build: the allocator view still works
            self.reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            log.debug("device memory sampler unavailable: %s", self.reason)

    def peak(self) -> int | None:
        return self.native.peak() if self.native else None

    def reset_peak(self) -> None:
        if self.native:
            self.native.reset_peak()

    def stop(self) -> None:
        if self.native:
            self.native.stop()


def nvml_process_bytes(device: torch.device) -> int | None:
    """GPU memory NVML attributes to this process (None without NVML, e.g. on CPU)."""
    import os
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            # by UUID: NVML numbers physical GPUs, torch numbers the ones CUDA_VISIBLE_DEVICES shows
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid():
                    return int(p.usedGpuMemory or 0)
            return None
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing, NVMLError_LibraryNotFound on CPU, containers hiding PIDs
        return None


class PhaseMemory:
    """Call `mark(phase)` at the end of each phase; peaks are kept per phase over the whole run. The
    device-level sampler (a CUDA extension, built at its first use) runs only when asked for."""

    def __init__(self, device: torch.device, device_sampler: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.allocator: dict[str, int] = {}
        self.device_level: dict[str, int] = {}
        self.rss: dict[str, int] = {}
        self.sampler = DeviceSampler(device) if self.cuda and device_sampler else None

    def mark(self, phase: str) -> None:
        if self.cuda:
            self.allocator[phase] = max(self.allocator.get(phase, 0), torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            peak = self.sampler.peak() if self.sampler else None
            if peak is not None:
                self.device_level[phase] = max(self.device_level.get(phase, 0), peak)
                self.sampler.reset_peak()
        else:
            self.rss[phase] = max(self.rss.get(phase, 0), psutil.Process().memory_info().rss)

    def report(self) -> dict:
        if not self.cuda:
            return {"measured_by": "process RSS at the end of each phase (psutil); no CUDA",
                    "rss": self.rss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.sampler is None:
            sampler = "no device-level sampler (training.measure_memory: device runs one)"
        elif self.sampler.native:
            sampler = "native cudaMemGetInfo sampler"
        else:
            sampler = f"no device-level sampler ({self.sampler.reason})"
        out = {"measured_by": f"CUDA caching allocator peak per phase; {sampler}"
                              + ("; pynvml process view" if self.sampler else ""),
               "allocator_peak": self.allocator, "device_peak": self.device_level or None,
               "nvml_process": nvml_process_bytes(self.device) if self.sampler else None,
               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        return out

    def close(self) -> None:
        if self.sampler:
            self.sampler.stop()


class NoMemory:
    """training.measure_memory: off — every mark is free and nothing is written."""

    def mark(self, phase: str) -> None:
        pass

    def close(self) -> None:
        pass
