"""`flush_denormals` reaches the threads of torch's OpenMP pool, not only the calling thread."""

import subprocess
import sys
import textwrap

import pytest
import torch

from experiments.denormals import FlushDenormalsCallback

# A fresh process, so that no earlier test has set the flags of any thread. Two threads even on a 1-core runner:
# the pool's second thread computes the second half of the elementwise product.
SCRIPT = textwrap.dedent(
    """
    import torch
    torch.set_num_threads(2)
    x = torch.full((1 << 22,), 1e-40)          # subnormal in float32
    torch.set_flush_denormal(True)
    main_only = int((x * 1.0 != 0).sum())      # the pool thread still keeps subnormals
    from experiments.denormals import flush_denormals
    reached = flush_denormals()
    print(main_only, reached, int((x * 1.0 != 0).sum()))
    """
)


def test_pool_threads_flush_subnormals_too():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    torch.set_flush_denormal(False)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    main_only, reached, after = int(out[0]), out[1] == "True", int(out[2])
    if not reached:
        pytest.skip("torch has no bundled libgomp here; only the calling thread can be flushed")
    assert main_only > 0  # the control: set_flush_denormal alone misses the pool thread's half
    assert after == 0


def test_callback_flushes_on_cpu_training():
    class Args:
        device = torch.device("cpu")

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    torch.set_flush_denormal(False)
    subnormal = torch.full((8,), 1e-40)
    assert (subnormal * 1.0 != 0).all()
    try:
        FlushDenormalsCallback().on_step_begin(Args(), None, None)
        assert (subnormal * 1.0 == 0).all()
    finally:
        torch.set_flush_denormal(False)  # leave the test process as it was
