"""Which call of the model is the measured forward (`_ForwardWatch`), and the keywords it got."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import Hooked


class _ForwardWatch(Hooked):
    """Which call of `model` inside a `capturing()` block is the measured forward, and the keywords it got.

    The measured forward is the first call of `model` in the block that computes gradients when the block was entered
    with gradients (a training step: a reference, KL or metrics forward under `no_grad`, before or after it, is not
    it). In a block without gradients (evaluation, where every call is without them) it is the call at the place the
    measured one had in the last training block (TRL's KTO runs its KL forward first: the policy's is the second),
    the first before any training. Calls of `model` inside its own forward belong to the outer one. `nn.DataParallel`'s
    replicas share `model`'s hooks but are other objects: they are not tracked (`state()` is `None` there, as outside
    any forward).

    `inner` is the module whose outputs hold the hidden states (the backbone; `model` itself where it has none): the
    keywords of its first call inside the measured forward are kept too (`inputs_seen`), and `inject` may add to them.
    A trainer may call the backbone with keywords of its own (TRL's fused LM head, its distillation), or call the
    model with no keywords at all (a forward redirected through a wrapper).

    Args:
        model: the module whose calls are the forwards (the unwrapped model).
        inner: the backbone (default `model`).
        inject: optional `(args, kwargs) -> kwargs` applied to `inner`'s keywords in the measured forward (and in
            forwards not tracked: replicas).
    """

    def __init__(
        self,
        model: nn.Module,
        inner: nn.Module | None = None,
        inject: Callable[[tuple, dict[str, Any]], dict[str, Any]] | None = None,
    ):
        super().__init__()
        self.model = model
        self.inner = inner if inner is not None else model
        self.inject = inject
        self.inputs: dict[str, Any] | None = None
        self.inner_inputs: dict[str, Any] | None = None
        self._active = self._grad = self._current = self._done = False
        self._depth = 0
        self._calls = 0  # calls of the model in this block
        self._index = 0  # which call the measured forward was in the last block with gradients
        self._handles += [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._leave, always_call=True),
        ]
        if self.inner is not model:
            self._handles.append(self.inner.register_forward_pre_hook(self._enter_inner, with_kwargs=True))

    def begin(self, grad_enabled: bool) -> None:
        self._active, self._grad = True, grad_enabled
        self._current = self._done = False
        self._depth = self._calls = 0
        self.inputs = self.inner_inputs = None

    def end(self) -> None:
        self._active = False

    @property
    def measured_ran(self) -> bool:
        """Whether the measured forward ran (or runs) in the last block."""
        return self._done or self._current

    def state(self) -> bool | None:
        """`True` inside the measured forward, `False` inside another call of the model, `None` outside any."""
        if not self._active or self._depth == 0:
            return None
        return self._current

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if not self._active:
            return None
        if module is not self.model:  # a replica of nn.DataParallel: not tracked
            return self._inner_call(args, kwargs) if self.inner is self.model else None
        self._depth += 1
        if self._depth == 1:
            if self._grad:
                self._current = not self._done and torch.is_grad_enabled()
                if self._current:
                    self._index = self._calls
            else:
                self._current = not self._done and self._calls == self._index
            self._calls += 1
            if self._current:
                self.inputs = dict(kwargs)
        return self._inner_call(args, kwargs) if self.inner is self.model else None

    def _enter_inner(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        return self._inner_call(args, kwargs) if self._active else None

    def _inner_call(self, args: tuple, kwargs: dict[str, Any]):
        state = self.state()
        if state is False or (state is True and self.inner_inputs is not None):
            return None  # another forward, or a second call of the backbone inside the measured one
        if self.inject is not None:
            kwargs = self.inject(args, kwargs)
        if state is True:
            self.inner_inputs = dict(kwargs)
        return args, kwargs

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active or module is not self.model or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._current:
            self._current, self._done = False, True

    def inputs_seen(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` updated with the keywords of the measured forward, then with those its backbone got."""
        if self.inputs is None and self.inner_inputs is None:
            return batch
        return {**batch, **(self.inputs or {}), **(self.inner_inputs or {})}
