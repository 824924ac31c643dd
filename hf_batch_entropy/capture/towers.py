"""Which tower call of a model produced an activation, and so which inputs (which `attention_mask`) it belongs to."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .base import Hooked, forward_parameters


# The inputs a tower of a model starts from: tokens (whose padding `attention_mask` marks), or other modalities.
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")
_OTHER_INPUTS = ("pixel_values", "pixel_values_videos", "input_features", "input_values")


class _Towers(Hooked):
    """Which call of the model's towers produced an activation, and so which keyword inputs (which `attention_mask`)
    it belongs to: a mask is applied by what produced the activation, never because shapes happen to match.

    A tower is a submodule whose `forward` takes a model input by name (`input_ids`, `inputs_embeds`,
    `pixel_values`, `input_features`, ...): BERT's `BertModel` inside a `BertForMultipleChoice` (called with the
    `(B·C, T)` mask), CLIP's text and vision models. For an activation, the enclosing tower calls are searched from
    the innermost outwards: the first that got a token mask (`attention_mask` of 2 or 3 dimensions, not an extended
    4-d attention mask) gives its inputs; a tower of another modality (images, audio) that takes no `attention_mask`
    gives its own inputs, which have no token mask (CLIP's vision tower inside a model called with the text's mask).
    `None` where no tower call decides (the batch's inputs then apply, e.g. a packed batch without a mask).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._stack: list[tuple[dict[str, Any], bool]] = []
        self.active = False
        for name, module in model.named_modules():
            if not name:
                continue  # the model itself: its inputs are the batch's
            params = forward_parameters(module)
            if not any(key in params for key in _TOKEN_INPUTS + _OTHER_INPUTS):
                continue
            try:
                signature = inspect.signature(module.forward)
            except (TypeError, ValueError):
                continue
            self._handles += [
                module.register_forward_pre_hook(self._enter(signature, "attention_mask" in params), with_kwargs=True),
                module.register_forward_hook(self._leave, always_call=True),
            ]

    def _enter(self, signature: inspect.Signature, takes_mask: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not self.active:
                return
            try:
                arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                arguments = dict(kwargs)
            extra = next((k for k, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
            if extra is not None and isinstance(arguments.get(extra), dict):
                arguments.update(arguments.pop(extra))
            self._stack.append((arguments, takes_mask))

        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.active and self._stack:
            self._stack.pop()

    def begin(self) -> None:
        self._stack, self.active = [], True

    def end(self) -> None:
        self._stack, self.active = [], False

    def source(self) -> dict[str, Any] | None:
        """The keyword inputs of the tower call that decides the current activation's mask (see the class)."""
        for arguments, takes_mask in reversed(self._stack):
            mask = arguments.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() in (2, 3):
                return arguments
            tokens = any(arguments.get(k) is not None for k in _TOKEN_INPUTS)
            if not takes_mask and not tokens and any(arguments.get(k) is not None for k in _OTHER_INPUTS):
                return arguments
        return None
