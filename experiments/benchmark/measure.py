"""How the benchmark measures a step: its time (`StepTimer`, wall or CPU clock) and the peak memory of a turn
(CPU: `CpuPeakMemory`; CUDA: `cuda_peak_memory`)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import sys
import time

import torch
from transformers import TrainerCallback

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StepTimer(TrainerCallback):
    """Time of every optimizer step, from `on_step_begin` to `on_step_end`: wall time, or the CPU time of this process
    (all its threads; `--clock cpu`), which other jobs on a shared machine barely move."""

    def __init__(self, cuda: bool, clock: str = "wall"):
        self.cuda = cuda
        self.now = CLOCKS[clock]
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = self.now()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(self.now() - self._start)


class CpuPeakMemory:
    """Peak RSS above a baseline, with glibc tuned so that RSS follows live memory (see the module docstring)."""

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        self.available = False
        if sys.platform.startswith("linux"):
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self.available = self._reset_hwm() and self._status("VmHWM") is not None
            except OSError:
                self.available = False

    @staticmethod
    def _status(key: str) -> int | None:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    M_TRIM_THRESHOLD = -1

    def enter_measuring_mode(self) -> None:
        # Fixed (not dynamic) mmap threshold: every allocation above 64 KiB is its own mapping, unmapped on free; and
        # free heap memory above 128 KiB at the top of the heap goes back to the OS at once.
        self._libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
        self._libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)

    @contextlib.contextmanager
    def measure(self):
        result = {}
        gc.collect()
        self._libc.malloc_trim(0)
        base = self._status("VmRSS")
        self._reset_hwm()
        try:
            yield result
        finally:
            result["peak_bytes"] = self._status("VmHWM") - base


@contextlib.contextmanager
def cuda_peak_memory():
    result = {}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield result
    finally:
        torch.cuda.synchronize()
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - base
