"""The one place that decides where a model's regularized activations come from: `select_capture`, and where that
takes a forward, `CaptureSelection`."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .base import Capture, Hooked, forward_parameters
from .hidden_states import ASKING_KEYWORDS, HiddenStatesCapture, accepts_hidden_states
from .hooks import ForwardHookCapture
from .targets import default_target_modules, is_activation_module, resolve_target_modules

logger = logging.getLogger(__name__)


class _KeywordsNotTaken(Hooked):
    """While `active`: drop `output_hidden_states` and `return_dict` from the calls of the submodules whose `forward`
    takes them neither by name nor through `**kwargs`.

    A model whose `forward(x, **kwargs)` hands its keywords on to such a module (a plain backbone) would raise a
    TypeError only because the capture asked it for its hidden states, where `Trainer` trains it. With them dropped
    the forward runs as it would without LBE and (unless a part of it returns hidden states) the hooks are chosen.
    `rejected` names the first module whose call lost them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.active = False
        self.rejected: str | None = None
        for name, module in model.named_modules():
            # What the call itself takes: a decorator may take a keyword that the function it wraps does not.
            params = forward_parameters(module, follow_wrapped=False)
            if not name or not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue  # the model itself (it takes them), an unintrospectable forward, one that takes **kwargs
            not_taken = tuple(key for key in ASKING_KEYWORDS if key not in params)
            if not_taken:
                self._handles.append(module.register_forward_pre_hook(self._drop(name, not_taken), with_kwargs=True))

    def _drop(self, name: str, not_taken: tuple[str, ...]):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            if not self.active or not any(key in kwargs for key in not_taken):
                return None
            self.rejected = self.rejected or f"{name} ({type(module).__name__})"
            return args, {k: v for k, v in kwargs.items() if k not in not_taken}

        return hook


def _names_asking_keyword(err: TypeError) -> bool:
    return any(key in str(err) for key in ASKING_KEYWORDS)


class CaptureSelection(Capture):
    """Hidden states, or else forward hooks on the default modules, chosen at the first forward it records.

    For a Transformers model whose `forward` takes `output_hidden_states`, whether it returns any is known only from a
    forward: both captures record that first forward (the hooks keep references, no copies), `collect` keeps the
    hidden states where there are any, else the hooks' activations, and removes the other capture. From then on it is
    the chosen capture (`chosen`). No forward of its own: the first one the caller runs decides. A forward that hands
    `output_hidden_states` on to a module that does not take it runs without it (`_KeywordsNotTaken`) and so chooses
    the hooks; one that hands it on to a function raises a TypeError that says to set `lbe_target_modules`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model_name = type(model).__name__
        self._candidates: list[Capture] = [HiddenStatesCapture(model)]
        self._defaults = default_target_modules(model)
        if self._defaults:
            self._candidates.append(ForwardHookCapture(self._defaults, model))
        self._not_taken = _KeywordsNotTaken(model)
        self._parts += [*self._candidates, self._not_taken]
        self.chosen: Capture | None = None

    @property
    def _current(self) -> Capture:
        return self.chosen or self._candidates[0]

    @property
    def source(self) -> str:
        return self._current.source

    @property
    def measured_ran(self) -> bool:
        return self._current.measured_ran

    def take_sources(self) -> list[dict[str, Any] | None] | None:
        return self._current.take_sources()

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self._current.prepare_inputs(inputs)

    def inputs_seen(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self._current.inputs_seen(batch)

    def restore(self, outputs: Any, keep_hidden_states: bool = False) -> Any:
        return self._current.restore(outputs, keep_hidden_states=keep_hidden_states)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for capture in self._candidates:  # once chosen, the chosen one alone
                stack.enter_context(capture.capturing())
            self._not_taken.active = self.chosen is None
            try:
                yield
            except TypeError as err:
                if self.chosen is not None or not _names_asking_keyword(err):
                    raise
                raise TypeError(
                    f"{self._model_name}'s forward hands output_hidden_states (which LBE asks for) on to a call that "
                    f"does not take it: {err}. Pass lbe_target_modules=[...] naming the layers to regularize (they are "
                    "then recorded by forward hooks, and the model is not asked for its hidden states)."
                ) from err
            finally:
                self._not_taken.active = False

    def collect(self, outputs: Any = None) -> tuple[list[torch.Tensor], list[str]]:
        if self.chosen is not None:
            return self.chosen.collect(outputs)
        hidden_capture = self._candidates[0]
        hidden = hidden_capture.collect(outputs)
        if hidden[0] or not hidden_capture.measured_ran:
            if len(self._candidates) > 1:
                self._candidates[1].discard()
            if hidden[0]:
                self._choose(0)
                logger.info(f"Batch-entropy layers: {_describe(hidden[1])} (hidden_states).")
            return hidden  # the hidden states; or nothing yet, where no forward of the model ran in that block
        hooks = self._candidates[1].collect() if len(self._candidates) > 1 else ([], [])
        if not hooks[0]:
            raise ValueError(
                f"{self._model_name} returned no hidden_states with output_hidden_states=True and has no activation, "
                "Linear or Conv module to hook: there is nothing to regularize. Pass lbe_target_modules=[...] naming "
                "the layers to regularize."
            )
        rejected = self._not_taken.rejected
        self._choose(1)
        if rejected is not None:
            logger.info(
                f"{self._model_name} hands output_hidden_states on to {rejected}, which does not take it: regularizing "
                f"the outputs of its {_kind(self._defaults)} instead ({_describe(hooks[1])}; set lbe_target_modules "
                "to choose)."
            )
            return hooks
        logger.warning(
            f"{self._model_name} returned no hidden_states with output_hidden_states=True; regularizing the outputs "
            "of its activation modules instead (set lbe_target_modules to choose)."
        )
        logger.warning(f"Batch-entropy layers: {_describe(hooks[1])} (forward_hooks).")
        return hooks

    def discard(self) -> None:
        for capture in self._candidates:
            capture.discard()

    def choose_hooks(self) -> None:
        """Give up the hidden states (a forward that rejected `output_hidden_states`): the hooks from now on."""
        if len(self._candidates) < 2:
            raise ValueError(
                f"{self._model_name} does not take output_hidden_states and has no activation, Linear or Conv module "
                "to hook: there is nothing to regularize. Pass lbe_target_modules=[...] naming the layers."
            )
        self._choose(1)

    def _choose(self, index: int) -> None:
        self.chosen = self._candidates[index]
        for part in self._parts:
            if part is not self.chosen:
                part.remove()
        self._candidates, self._parts = [self.chosen], [self.chosen]


def select_capture(
    model: nn.Module,
    target_modules: Any,
    probe: Callable[[Capture], tuple[list[torch.Tensor], list[str]]] | None = None,
) -> Capture | tuple[Capture, list[torch.Tensor], list[str]]:
    """Choose where the regularized activations of `model` come from: the one place that decides.

    1. `target_modules` given: forward hooks on those modules;
    2. else a Transformers model whose `forward` takes `output_hidden_states`: its `hidden_states`, if its forward
       returns any (decided at the first forward, `CaptureSelection`);
    3. else forward hooks on the default modules (`default_target_modules`).

    Args:
        model: the unwrapped model (hooks go on its modules, its `forward` signature is read).
        target_modules: `lbe_target_modules` (see `resolve_target_modules`).
        probe: optional; runs one forward of the model with a capture, as
            `capture.collect(model(**capture.prepare_inputs(batch)))` inside `capture.capturing()`, and returns the
            `(activations, names)` it collected.

    Returns:
        Without `probe`, the capture (a `CaptureSelection` decides at its first `collect`, the others check there
        that their modules ran). With `probe`: the chosen capture, and the activations and layer names of the probe's
        forward.
    """
    if target_modules is None and accepts_hidden_states(model):
        capture: Capture = CaptureSelection(model)
    else:
        capture = ForwardHookCapture(resolve_target_modules(model, target_modules), model)
        if target_modules is None:
            chosen = default_target_modules(model)
            logger.warning(
                f"{type(model).__name__} returns no hidden states: regularizing the outputs of its {_kind(chosen)} "
                f"({_describe([name for name, _ in chosen])}; set lbe_target_modules to choose)."
            )
    if probe is None:
        return capture
    try:
        activations, names = probe(capture)
    except TypeError as err:  # a forward that passes **kwargs on to a function that does not take them
        if not isinstance(capture, CaptureSelection) or not _names_asking_keyword(err):
            raise
        capture.choose_hooks()
        activations, names = probe(capture)
    if isinstance(capture, CaptureSelection):
        capture = capture.chosen
    return capture, activations, names


def _kind(modules: Sequence[tuple[str, nn.Module]]) -> str:
    return "activation modules" if any(is_activation_module(m) for _, m in modules) else "Linear/Conv layers"


def _describe(names: Sequence[str]) -> str:
    return f"{len(names)} layers: {', '.join(names[:8])}{' ... ' + names[-1] if len(names) > 8 else ''}"
