"""Test-only shim: lets Accelerate (and so `Trainer`) run FSDP2 on CPU processes with gloo.

Accelerate keeps the FSDP plugin only for GPU-like distributed types: in `accelerate/state.py`
(`AcceleratorState.__init__`, accelerate 1.15 about line 985) the branch

    elif self.distributed_type in [DistributedType.MULTI_GPU, ..., DistributedType.MULTI_NEURON]:
        ...
        if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin is not None) ...:
            self.distributed_type = DistributedType.FSDP
            ...
            self.fsdp_plugin = fsdp_plugin

does not list `DistributedType.MULTI_CPU`, so on CPU processes (`use_cpu=True`, gloo) the plugin is dropped without a
warning, the last line of `__init__` (`PartialState._shared_state["distributed_type"] = self.distributed_type`)
records MULTI_CPU, and `Trainer(fsdp=...)` or `accelerate launch --config_file fsdp.yaml` trains as plain DDP.
`install()` wraps `AcceleratorState.__init__` and redoes that branch, and that last line, for `MULTI_CPU`; everything
after it is Accelerate's and torch's own code (`fsdp2_prepare_model`, `fully_shard` on a CPU device mesh, DTensor
parameters, the optimizer's switch to the sharded parameters, `get_state_dict`, `save_fsdp_model` /
`load_fsdp_model`).

Installed by calling `install()` in the training process before the `Trainer` (its `TrainingArguments`) is created;
`tests/engine_worker.py` does so when `HF_BATCH_ENTROPY_TEST_FSDP_CPU=1`.

This is a test fixture, not part of the package: on GPUs Accelerate keeps the plugin by itself.
"""

from __future__ import annotations

import functools
import inspect
import os

_INSTALLED = False


def install() -> None:
    """Make `AcceleratorState` keep the FSDP plugin on `MULTI_CPU` (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        # Set up once per state (the first Accelerator); later `AcceleratorState()` calls only read it.
        was_initialized = "deepspeed_plugins" in AcceleratorState._shared_state
        original(self, *args, **kwargs)
        if was_initialized:
            return
        bound = signature.bind(self, *args, **kwargs)
        fsdp_plugin = bound.arguments.get("fsdp_plugin")
        use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin is not None
        if self.distributed_type == DistributedType.MULTI_CPU and use_fsdp:
            # The branch of accelerate/state.py quoted above, for MULTI_CPU.
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no" and fsdp_plugin is not None:
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # As the end of AcceleratorState.__init__ does: later AcceleratorState() calls copy PartialState's state.
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = __init__
    _INSTALLED = True
