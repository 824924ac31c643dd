"""Where the regularized activations come from.

Two sources, one interface (`prepare_inputs` → forward → `collect`, inside `capturing()`):

- `HiddenStatesCapture`: a Transformers model's own `hidden_states` (`output_hidden_states=True`): embeddings plus
  every layer's output; encoder and decoder ones for encoder-decoder models.
- `ForwardHookCapture`: forward hooks on chosen submodules of any `nn.Module` (an MLP, a CNN, a timm backbone). The
  modules are chosen PEFT-style (`lbe_target_modules`: names matched exactly or as a dotted suffix, a regex, or module
  classes), by default the activation modules (`nn.ReLU`, `nn.GELU`, …), else every `Linear`/`Conv` layer.

Hooks record only inside `capturing()` (the training forward), so evaluation, generation and the recomputation of
gradient checkpointing cost nothing, and `collect` hands the tensors over and forgets them, so no activation outlives
its step. A functional activation (`F.relu(x)` inside `forward`) has no module to hook: expose it as a module
(`self.act = nn.ReLU()`), or target the layer whose output you want (e.g. the `Linear` before it).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import REGEX_PREFIX

logger = logging.getLogger(__name__)

__all__ = [
    "ForwardHookCapture",
    "HiddenStatesCapture",
    "default_target_modules",
    "resolve_target_modules",
]

HIDDEN_STATE_KEYS = ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")

# torch.nn.modules.activation also holds modules that are not elementwise activations of a layer.
_NOT_ACTIVATIONS = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention")


def _is_activation_module(module: nn.Module) -> bool:
    cls = type(module)
    if cls.__module__ == "torch.nn.modules.activation":
        return cls.__name__ not in _NOT_ACTIVATIONS
    return cls.__module__ == "transformers.activations"


def default_target_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules of `model`, or, where it has none, its `Linear` and `Conv` layers."""
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen = [(n, m) for n, m in named if _is_activation_module(m)]
    if not chosen:
        chosen = [(n, m) for n, m in named if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    return chosen


def resolve_target_modules(model: nn.Module, targets: Any) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs of `model` selected by `targets`, in `named_modules()` order.

    `targets` is, as PEFT's `target_modules`: `None` (the defaults, see `default_target_modules`); a string, taken as
    a regex that must match a module's full name; or a list whose entries are names (matched exactly or as a dotted
    suffix: `act` matches `blocks.3.act`), `"re:<regex>"` strings, or `nn.Module` subclasses.
    """
    if targets is None:
        chosen = default_target_modules(model)
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} returns no hidden states and has no activation, Linear or Conv module to "
                "hook: there is nothing to regularize. Pass lbe_target_modules=[...] naming the layers to regularize."
            )
        return chosen
    if isinstance(targets, str):
        targets = [REGEX_PREFIX + targets]
    elif isinstance(targets, type):
        targets = [targets]
    matchers = []
    for target in targets:
        if isinstance(target, type):
            matchers.append(lambda name, module, cls=target: isinstance(module, cls))
        elif target.startswith(REGEX_PREFIX):
            pattern = re.compile(target[len(REGEX_PREFIX) :])
            matchers.append(lambda name, module, p=pattern: p.fullmatch(name) is not None)
        else:
            matchers.append(lambda name, module, t=target: name == t or name.endswith("." + t))
    chosen = [(n, m) for n, m in model.named_modules() if n and any(match(n, m) for match in matchers)]
    if not chosen:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise ValueError(
            f"lbe_target_modules={targets!r} matches no module of {type(model).__name__}. Its modules are: {shown}"
        )
    return chosen


class HiddenStatesCapture:
    """Regularize the `hidden_states` a Transformers model returns with `output_hidden_states=True`."""

    source = "hidden_states"

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {**inputs, "output_hidden_states": True}

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        yield

    @staticmethod
    def collect(outputs: Any) -> tuple[list[torch.Tensor], list[str]]:
        """The hidden states in `outputs` and their names: `hidden_states`, or else the encoder's then the decoder's."""

        def get(key: str):
            return outputs.get(key) if isinstance(outputs, dict) else getattr(outputs, key, None)

        keys = ["hidden_states"] if get("hidden_states") is not None else ["encoder_hidden_states", "decoder_hidden_states"]
        activations, names = [], []
        for key in keys:
            states = get(key)
            if states is not None:
                activations.extend(states)
                names.extend(f"{key}.{i}" for i in range(len(states)))
        return activations, names

    @staticmethod
    def strip(outputs: Any) -> Any:
        """`outputs` without the hidden states we asked for, so callers (e.g. evaluation) see what they expect."""
        if not isinstance(outputs, dict) or not any(outputs.get(k) is not None for k in HIDDEN_STATE_KEYS):
            return outputs
        return type(outputs)(**{k: v for k, v in outputs.items() if k not in HIDDEN_STATE_KEYS})

    def remove(self) -> None:
        pass


class ForwardHookCapture:
    """Regularize the outputs of chosen submodules, recorded by forward hooks.

    A module called several times per forward (a shared activation) contributes one activation per call.
    """

    source = "forward_hooks"

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]):
        if not modules:
            raise ValueError("ForwardHookCapture needs at least one module to hook.")
        self.module_names = [name for name, _ in modules]
        self._active = False
        self._activations: list[torch.Tensor] = []
        self._names: list[str] = []
        self._calls: dict[str, int] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            tensor = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"Module {name!r} ({type(module).__name__}) returned {type(output).__name__}, not a tensor: its "
                    "output cannot be regularized. Target a module that returns a tensor (lbe_target_modules)."
                )
            calls = self._calls.get(name, 0)
            self._calls[name] = calls + 1
            self._activations.append(tensor)
            self._names.append(name if calls == 0 else f"{name}#{calls}")

        return hook

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self._active = True
        self._activations, self._names, self._calls = [], [], {}
        try:
            yield
        finally:
            self._active = False

    def collect(self, outputs: Any = None) -> tuple[list[torch.Tensor], list[str]]:
        """Hand over the activations recorded in the last `capturing()` block, and forget them."""
        activations, names = self._activations, self._names
        self._activations, self._names, self._calls = [], [], {}
        return activations, names

    @staticmethod
    def strip(outputs: Any) -> Any:
        return outputs

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
