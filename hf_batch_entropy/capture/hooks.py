"""Regularize the outputs of chosen submodules of any `nn.Module`, recorded by forward hooks: `ForwardHookCapture`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import Capture
from .hidden_states import models_returning_states
from .towers import _Towers
from .watch import _ForwardWatch

# Modules whose autograd Function runs a checkpointed block under `no_grad` in the forward and recomputes it in the
# backward (reentrant activation checkpointing): torch's and DeepSpeed's.
_REENTRANT_CHECKPOINT_MODULES = ("torch.utils.checkpoint", "deepspeed.runtime.activation_checkpointing.checkpointing")


def _in_reentrant_checkpoint() -> bool:
    """Whether the caller runs inside the forward of a reentrant checkpoint function (walks the Python stack: called
    only for an activation computed without gradients inside a block with gradients, never on the common path)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "forward" and frame.f_globals.get("__name__") in _REENTRANT_CHECKPOINT_MODULES:
            return True
        frame = frame.f_back
    return False


class ForwardHookCapture(Capture):
    """Regularize the outputs of chosen submodules, recorded by forward hooks.

    A module called several times per forward (a shared activation) contributes one activation per call. With `model`
    given, only its measured forward is recorded (see the package's docstring); in a block with gradients, an output
    computed without them is left out (a stop-gradient branch, a no-grad forward), or is an error inside reentrant
    gradient checkpointing, whose recomputation LBE's gradient could not reach.

    Args:
        modules: the `(name, module)` pairs to hook.
        model: the model they belong to, whose calls are the forwards; `None`: every call inside `capturing()` counts.
    """

    source = "forward_hooks"

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], model: nn.Module | None = None):
        if not modules:
            raise ValueError("ForwardHookCapture needs at least one module to hook.")
        self.module_names = [name for name, _ in modules]
        self._activations: list[torch.Tensor] = []
        self._names: list[str] = []
        self._calls: dict[str, int] = {}
        self._left_out = 0  # outputs without gradients left out in the last block
        self._block = False  # a capturing() block ran since the last collect
        self._error: Exception | None = None  # found while recording, raised by collect
        self._grad_enabled = False  # whether the forward inside `capturing()` computes gradients
        self._sources: list[dict[str, Any] | None] = []
        self._collected_sources: list[dict[str, Any] | None] = []
        super().__init__(_ForwardWatch(model, inner=models_returning_states(model)[-1]) if model is not None else None)
        self._towers = _Towers(model) if model is not None else None
        if self._towers is not None:
            self._parts.append(self._towers)
        self._handles += [module.register_forward_hook(self._hook(name)) for name, module in modules]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            if self._watch is not None and self._watch.state() is False:
                return  # another forward of the model (a reference, KL or metrics forward): not the measured one
            tensor = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"Module {name!r} ({type(module).__name__}) returned {type(output).__name__}, not a tensor: its "
                    "output cannot be regularized. Target a module that returns a tensor (lbe_target_modules)."
                )
            if not (tensor.is_floating_point() or tensor.is_complex()):
                # An argmax, a mask, token ids: no variance to train and no gradient to carry.
                raise TypeError(
                    f"Module {name!r} ({type(module).__name__}) returned a {tensor.dtype} tensor: batch-entropy needs "
                    "floating-point activations, and an integer or boolean output has no gradient to regularize. "
                    "Leave it out of lbe_target_modules (target the layer whose output it reads)."
                )
            if self._grad_enabled and not torch.is_grad_enabled():
                if _in_reentrant_checkpoint():
                    # Raised by `collect` (so that a `CaptureSelection` that keeps the hidden states is not stopped).
                    self._error = self._error or RuntimeError(
                        f"The output of {name!r} ({type(module).__name__}) was computed without gradients inside a "
                        "training forward, so LBE's gradient cannot reach the layers before it: reentrant gradient "
                        "checkpointing runs the checkpointed blocks under no_grad and recomputes them in the backward. "
                        "Use gradient_checkpointing_kwargs={'use_reentrant': False}, or leave the module out of "
                        "lbe_target_modules."
                    )
                    return
                self._left_out += 1  # no gradient to train it with (a no-grad forward, a stop-gradient branch)
                return
            calls = self._calls.get(name, 0)
            self._calls[name] = calls + 1
            self._activations.append(tensor)
            self._names.append(name if calls == 0 else f"{name}#{calls}")
            self._sources.append(self._towers.source() if self._towers is not None else None)

        return hook

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return dict(inputs)

    def take_sources(self) -> list[dict[str, Any] | None]:
        """Per activation the last `collect` handed over, the keyword inputs of the tower call that produced it
        (`_Towers.source`), or `None` (the batch's); handed over and forgotten."""
        sources, self._collected_sources = self._collected_sources, []
        return sources

    def _begin(self) -> None:
        self.discard()
        self._grad_enabled, self._block = torch.is_grad_enabled(), True
        if self._towers is not None:
            self._towers.begin()

    def _end(self) -> None:
        if self._towers is not None:
            self._towers.end()

    def collect(self, outputs: Any = None) -> tuple[list[torch.Tensor], list[str]]:
        """Hand over the activations recorded in the last `capturing()` block, and forget them.

        Raises a `ValueError` where the model's measured forward ran but none of the hooked modules gave an output
        with gradients in it (none ran, or all ran without gradients): there would be nothing to regularize."""
        activations, names, left_out, block, error, sources = (
            self._activations, self._names, self._left_out, self._block, self._error, self._sources
        )
        self.discard()
        self._collected_sources = sources
        if error is not None:
            raise error
        if not activations and block and self.measured_ran:
            shown = ", ".join(self.module_names[:10])
            if left_out:
                raise ValueError(
                    f"The modules chosen for LBE ({shown}) computed their outputs without gradients in the training "
                    "forward (a stop-gradient branch, or torch.no_grad inside the model): LBE cannot train them. "
                    "Choose layers that train (lbe_target_modules)."
                )
            raise ValueError(
                f"None of the modules chosen for LBE ({shown}) ran in the forward pass. Check lbe_target_modules."
            )
        return activations, names

    def discard(self) -> None:
        """Forget what the last `capturing()` block recorded, errors included."""
        self._activations, self._names, self._calls, self._sources = [], [], {}, []
        self._left_out, self._block, self._error = 0, False, None
