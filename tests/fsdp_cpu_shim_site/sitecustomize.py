"""Installs the test-only FSDP-on-CPU shim (`tests/fsdp_cpu_shim.py`) in every Python process started with this
folder on `PYTHONPATH` and `HF_BATCH_ENTROPY_TEST_FSDP_CPU=1`: the processes that `accelerate launch` starts run a
training script unchanged. Used by `tests/test_engines.py` only."""

import os
import sys

if os.environ.get("HF_BATCH_ENTROPY_TEST_FSDP_CPU") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fsdp_cpu_shim

    fsdp_cpu_shim.install()
