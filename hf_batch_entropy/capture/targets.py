"""Which modules forward hooks go on: PEFT-style `lbe_target_modules`, and the defaults without them."""

from __future__ import annotations

import re

from torch import nn

from .._compat import CONV_LAYERS
from ..config import REGEX_PREFIX, TargetModules

# torch.nn.modules.activation also holds modules that are not elementwise activations of a layer.
_NOT_ACTIVATIONS = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention")


def is_activation_module(module: nn.Module) -> bool:
    """Whether `module` is an elementwise activation: one of torch's (`nn.ReLU`, `nn.GELU`, ...) or transformers'."""
    cls = type(module)
    if cls.__module__ == "torch.nn.modules.activation":
        return cls.__name__ not in _NOT_ACTIVATIONS
    return cls.__module__ == "transformers.activations"


def default_target_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules of `model`, or, where it has none, its `Linear` and `Conv` layers."""
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen = [(n, m) for n, m in named if is_activation_module(m)]
    if not chosen:
        chosen = [(n, m) for n, m in named if isinstance(m, (nn.Linear, CONV_LAYERS))]
    return chosen


def resolve_target_modules(model: nn.Module, targets: TargetModules) -> list[tuple[str, nn.Module]]:
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
