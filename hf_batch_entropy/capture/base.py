"""The interface every capture has (`Capture`), the hooks they share the removal of, and what a `forward` takes."""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .watch import _ForwardWatch


def forward_parameters(module: nn.Module, follow_wrapped: bool = True) -> dict[str, inspect.Parameter]:
    """The parameters of `module.forward` by name (of the function a decorator wraps, unless `follow_wrapped=False`);
    empty where it cannot be introspected (a builtin)."""
    try:
        return dict(inspect.signature(module.forward, follow_wrapped=follow_wrapped).parameters)
    except (TypeError, ValueError):
        return {}


def takes_keyword(module: nn.Module, name: str) -> bool:
    """Whether `module.forward` takes the keyword `name`, by name or through `**kwargs`."""
    params = forward_parameters(module)
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class Hooked:
    """Something that puts hooks on a model: its own handles (`_handles`) and the parts that hold hooks of their own
    (`_parts`), all taken off by `remove`."""

    def __init__(self) -> None:
        self._handles: list[Any] = []  # anything with `remove()`: torch's RemovableHandle, another `Hooked`
        self._parts: list[Hooked] = []

    def remove(self) -> None:
        """Take the hooks off the model (idempotent)."""
        for handle in [*self._handles, *self._parts]:
            handle.remove()
        self._handles, self._parts = [], []


class Capture(Hooked, abc.ABC):
    """Where the regularized activations of one model come from, recorded from its forward.

    One step is: `with capture.capturing(): outputs = model(**capture.prepare_inputs(batch))` (or a trainer's loss
    that runs the model on those inputs), then `capture.collect(outputs)` for the activations and their layer names,
    `capture.inputs_seen(batch)` and `capture.take_sources()` for the inputs their masks are read from, and
    `capture.restore(outputs)` for the outputs the caller would have had without LBE.

    Subclasses set `source` (`"hidden_states"` or `"forward_hooks"`, as the model card and the metrics name it), and
    `_watch` where they watch which forward of the model is the measured one.
    """

    source: str

    def __init__(self, watch: _ForwardWatch | None = None) -> None:
        super().__init__()
        self._active = False  # inside a `capturing()` block
        self._watch = watch
        if watch is not None:
            self._parts.append(watch)

    @abc.abstractmethod
    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch to hand to the forward (or to the trainer that runs it): a new dict, so that what the trainer
        pops from it (`labels`, for label smoothing) stays in `inputs`, which LBE reads."""

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """A block inside which the measured forward of the model is recorded (nothing is recorded outside one)."""
        self._begin()
        self._active = True
        if self._watch is not None:
            self._watch.begin(torch.is_grad_enabled())
        try:
            yield
        finally:
            self._active = False
            if self._watch is not None:
                self._watch.end()
            self._end()

    def _begin(self) -> None:
        """Start a block: forget what an earlier one left."""

    def _end(self) -> None:
        """End a block."""

    @abc.abstractmethod
    def collect(self, outputs: Any = None) -> tuple[list[torch.Tensor], list[str]]:
        """Hand over the activations recorded in the last `capturing()` block and their layer names, and forget
        them."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Forget what the last `capturing()` block recorded."""

    def restore(self, outputs: Any, keep_hidden_states: bool = False) -> Any:
        """`outputs` as the caller would have had them without LBE (unchanged, unless the capture asked for more)."""
        return outputs

    def inputs_seen(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` updated with the keyword inputs of the last block's measured forward (the masks its activations
        have: TRL's GRPO builds `attention_mask` from the prompt's and the completion's); what it did not get (labels
        a trainer popped) stays the batch's."""
        return batch if self._watch is None else self._watch.inputs_seen(batch)

    def take_sources(self) -> list[dict[str, Any] | None] | None:
        """Per activation the last `collect` handed over, the inputs its mask is read from (`None` for one: the
        batch's); `None` for all where `inputs_seen` holds them. Handed over and forgotten."""
        return None

    @property
    def measured_ran(self) -> bool:
        """Whether the measured forward of the model ran in the last `capturing()` block (`False` where no model is
        watched)."""
        return self._watch is not None and self._watch.measured_ran

