"""Flushing subnormal floats to zero on CPU, on every thread that does the arithmetic.

Deep vanilla networks at initialization carry subnormal floats (|x| < 1.18e-38), mostly in the backward pass of the
layers whose batch-entropy is ~0, and CPU arithmetic on them is slow (docs/vanilla.md: 1.1-2.8x per step for the
depth-500 MLPs; a 128x1000 @ 1000x1000 product with subnormal inputs took 3 ms on 1 thread and 180 ms on 2 when only
the main thread flushed). Flushing them changes values only below 1.2e-38, which are ~0 for every purpose here.

`torch.set_flush_denormal(True)` sets the FTZ/DAZ flags of the calling thread only; the threads of torch's OpenMP pool
run their share of every parallel matrix product with their own flags. `flush_denormals` therefore also makes the call
inside one OpenMP parallel region of the libgomp that torch ships, i.e. once on every pool thread, and
`FlushDenormalsCallback` repeats it at every optimizer step (about 0.1 ms), because the pool may start threads later.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import torch
from transformers import TrainerCallback

@functools.cache
def _pool_entry():
    """`(GOMP_parallel, callback)` of the libgomp that torch ships, or `None` without one; found once per process (it
    runs at every optimizer step). Caching also keeps the ctypes callback alive while libgomp may call it."""
    libraries = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    if not libraries:
        return None
    try:
        parallel = ctypes.CDLL(libraries[0]).GOMP_parallel
    except (OSError, AttributeError):
        return None
    return parallel, ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(True))


def flush_denormals() -> bool:
    """Flush subnormal floats to zero on the calling thread and on every thread of torch's OpenMP pool.

    Returns:
        `True` if the OpenMP pool was reached as well, `False` if only the calling thread was flushed (torch built
        without a bundled libgomp, e.g. on macOS; then use 1 thread, `torch.set_num_threads(1)`, to be safe).
    """
    if not torch.set_flush_denormal(True):
        return False  # the CPU has no FTZ/DAZ (not x86 with SSE3): nothing to do on any thread
    entry = _pool_entry()
    if entry is None:
        return False
    parallel, callback = entry
    parallel(callback, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))
    return True


class FlushDenormalsCallback(TrainerCallback):
    """Calls `flush_denormals` when training starts and before every optimizer step (CPU training only)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.device.type == "cpu":
            flush_denormals()

    def on_step_begin(self, args, state, control, **kwargs):
        if args.device.type == "cpu":
            flush_denormals()
