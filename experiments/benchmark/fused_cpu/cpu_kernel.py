"""The estimator's float32 CPU passes as one compiled loop per chunk of layers.

On CPUs the fused estimator's cost is not its arithmetic (one read of each activation for the mean, one for the squared
deviations, one write of each gradient) but the number of PyTorch operations it runs: a few per layer, each with its
dispatch and its own pass over memory, which on a 500-layer network is a tenth of a training step. `csrc/
squared_deviations.cpp` does a whole chunk of same-shaped layers in one call, forward and backward, with **the same
rounding** as the operators (it adds in the order of ATen's CPU sum), so results do not depend on which path ran.

It is compiled at first use with `torch.utils.cpp_extension` (a C++ compiler and `ninja`; a minute, once: the build is
cached in `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`, and rebuilt when the source or torch
changes). Where it cannot be built the estimator keeps PyTorch's operators (same numbers, slower) and says so once.
`HF_BATCH_ENTROPY_CPU_KERNEL=0` turns it off.

It takes a chunk only where it knows ATen's summation order: unmasked, contiguous float32 `(B, U)` layers (`U ≥ 2`) on an x86-64
CPU whose ATen kernels are `AVX2` or `DEFAULT` (8-float vectors). Masked (token-level) layers, other dtypes, AVX-512
kernels, other architectures, accelerators and `torch.compile` take the operators.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import warnings
from collections.abc import Sequence

import torch

__all__ = ["ENV_VAR", "handles", "squared_deviations", "squared_deviations_backward", "status"]

logger = logging.getLogger(__name__)

ENV_VAR = "HF_BATCH_ENTROPY_CPU_KERNEL"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "squared_deviations.cpp")

# ATen's x86 CPU kernel sets whose float vectors have 8 lanes. Its sum over the batch adds the columns 4 vectors at a
# time with one order (a cascade) and the leftover columns with another (see the C++ source); rows narrower than one
# vector go 4 columns at a time.
_EIGHT_LANE_CAPABILITIES = ("AVX2", "DEFAULT")
_LANES = 8

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the compiled extension or None once tried; "capability": ATen's


def _enabled() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("1", "true", "yes", "on", ""):
        raise ValueError(f"{ENV_VAR}={value!r}: use 1 (compile and use the CPU kernel, the default) or 0 (PyTorch's "
                         "operators only).")
    return True


def _build():
    """The compiled extension, or None (turned off, or it could not be built: then warned once)."""
    flags = ["/O2"] if os.name == "nt" else ["-O3", "-ffp-contract=off"]
    logger.info("hf_batch_entropy: compiling the estimator's CPU kernel (once; cached in TORCH_EXTENSIONS_DIR)")
    try:
        from torch.utils.cpp_extension import load  # imports setuptools, which a bare environment may lack

        return load(name="hf_batch_entropy_cpu", sources=[_SOURCE], extra_cflags=flags, verbose=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache, ...: the operators still work
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _state["failure"] = f"{type(error).__name__}: {reason}"
        warnings.warn(
            f"hf_batch_entropy could not compile its CPU kernel ({type(error).__name__}: {reason}). The estimator uses "
            "PyTorch's operators instead: the same numbers, slower on CPUs (about a tenth of a training step on a "
            f"500-layer network). It needs a C++ compiler and `pip install ninja`; set {ENV_VAR}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _module():
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                _state["module"] = _build() if _enabled() else None
    return _state["module"]


def _eight_lane_aten() -> bool:
    if "capability" not in _state:
        machine = platform.machine().lower()
        _state["capability"] = (torch.backends.cpu.get_cpu_capability()
                                if machine in ("x86_64", "amd64") else f"not x86-64 ({machine})")
    return _state["capability"] in _EIGHT_LANE_CAPABILITIES


def status() -> str:
    """What the estimator's float32 CPU chunks run on in this process, for logs and benchmark records: "compiled",
    "operators: ..." with the reason, or "not tried yet" before the first chunk."""
    if "capability" in _state and not _eight_lane_aten():
        return f"operators: ATen's {_state['capability']} kernels (another summation order)"
    if "module" not in _state:
        return "not tried yet"
    if _state["module"] is not None:
        return "compiled"
    if "failure" in _state:
        return f"operators: the kernel could not be built ({_state['failure']})"
    return f"operators: turned off ({ENV_VAR})"


def handles(layers: Sequence[torch.Tensor], mask: torch.Tensor | None) -> bool:
    """Whether the chunk `layers` (same-shaped `(B, U)` views; `mask` its unit mask or None) goes through the kernel:
    the one place that decides. Compiles the kernel the first time a chunk qualifies."""
    first = layers[0]
    # A single unit: ATen reduces a (B, 1) layer as one contiguous row, in another order.
    if (mask is not None or first.device.type != "cpu" or first.dtype != torch.float32 or first.dim() != 2
            or first.shape[1] < 2 or torch.compiler.is_compiling()):
        return False
    # Plain dense tensors: not subclasses (DTensor, fake tensors), whose memory the loops cannot read.
    if not all(type(x) is torch.Tensor and x.layout == torch.strided and x.is_contiguous() for x in layers):
        return False
    return _eight_lane_aten() and _module() is not None


def _cascade_columns(num_units: int) -> int:
    """How many leading columns ATen's CPU sum over the batch adds with its cascade (the rest: interleaved by four),
    for 8-lane kernels: whole blocks of 4 vectors, or of 4 columns where a row is narrower than one vector."""
    block = 4 * _LANES if num_units >= _LANES else 4
    return num_units - num_units % block


def squared_deviations(layers: Sequence[torch.Tensor], mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_b (x − μ)²  (L, U), μ  (L, 1, U))` of `L` layers `(B, U)` for which `handles` is true; `μ` the batch mean
    where `mean` is None, else `mean` itself."""
    squares, means = _module().squared_deviations(list(layers), mean, _cascade_columns(layers[0].shape[1]))
    return squares, (mean if mean is not None else means)


def squared_deviations_backward(layers: Sequence[torch.Tensor], grad: torch.Tensor, mean: torch.Tensor) -> list[torch.Tensor]:
    """Per layer `(x − μ)·(2·g)` `(B, U)`, each a fresh tensor; `grad` `(L, U)`, `mean` `(L, 1, U)`."""
    return _module().squared_deviations_backward(list(layers), grad, mean)
