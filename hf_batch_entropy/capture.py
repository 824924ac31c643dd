"""Where the regularized activations come from.

Two sources, one interface (`prepare_inputs` → forward → `collect` → `restore`, inside `capturing()`), and one place
that chooses between them, `select_capture`:

- `HiddenStatesCapture`: a Transformers model's own `hidden_states` (`output_hidden_states=True`): embeddings plus
  every layer's output; encoder and decoder ones for encoder-decoder models.
- `ForwardHookCapture`: forward hooks on chosen submodules of any `nn.Module` (an MLP, a CNN, a timm backbone). The
  modules are chosen PEFT-style (`lbe_target_modules`: names matched exactly or as a dotted suffix, a regex, or module
  classes), by default the activation modules (`nn.ReLU`, `nn.GELU`, …), else every `Linear`/`Conv` layer.

Hooks record only inside `capturing()` (the training forward), so evaluation, generation and the recomputation of
gradient checkpointing cost nothing, and `collect` hands the tensors over and forgets them, so no activation outlives
its step. A hooked module whose output is computed without gradients inside a forward that has them (reentrant
gradient checkpointing runs the checkpointed blocks under `no_grad` and recomputes them in the backward, unseen) is
an error: LBE's gradient could not reach it.

Which positions of the captured activations are real tokens is `tokens.py`'s concern, not this module's. A functional activation (`F.relu(x)` inside `forward`) has no module to hook: expose it as a module
(`self.act = nn.ReLU()`), or target the layer whose output you want (e.g. the `Linear` before it).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ._compat import CONV_LAYERS
from .config import REGEX_PREFIX, TargetModules

logger = logging.getLogger(__name__)

__all__ = [
    "ForwardHookCapture",
    "HiddenStatesCapture",
    "accepts_hidden_states",
    "default_target_modules",
    "resolve_target_modules",
    "select_capture",
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


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or otherwise unintrospectable forward
        return {}


def _accepts(model: nn.Module, name: str) -> bool:
    params = _forward_parameters(model)
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def accepts_hidden_states(model: nn.Module) -> bool:
    """Whether `model` is a Transformers model whose `forward` takes `output_hidden_states` (by name or `**kwargs`).

    A PEFT model counts as its base model: its `forward` hands the keyword arguments on to it."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, PreTrainedModel) and _accepts(model, "output_hidden_states") and (
        base is model or _accepts(base, "output_hidden_states")
    )


def _hidden_states_of(outputs: Any) -> list[tuple[str, Any]] | None:
    """The `(key, states)` pairs of the hidden states in a model's `outputs` (`hidden_states`, or else the encoder's
    then the decoder's), or `None` where it holds none."""

    def get(key: str):
        return outputs.get(key) if isinstance(outputs, dict) else getattr(outputs, key, None)

    if outputs is None or isinstance(outputs, (tuple, list, torch.Tensor)):
        return None
    keys = ["hidden_states"] if get("hidden_states") is not None else ["encoder_hidden_states", "decoder_hidden_states"]
    found = [(key, get(key)) for key in keys if get(key) is not None]
    return found or None


def _requires_grad(found: list[tuple[str, Any]]) -> bool:
    return any(isinstance(x, torch.Tensor) and x.requires_grad for _, states in found for x in states)


class HiddenStatesCapture:
    """Regularize the `hidden_states` a Transformers model returns with `output_hidden_states=True`.

    The forward is asked for a `ModelOutput` (`return_dict=True`) so that the hidden states can be found by name;
    `restore` hands the caller a tuple again where it asked for one (`return_dict=False` in the inputs or the config).

    The hidden states are also recorded, inside `capturing()`, from the first forward of the model (or of its
    backbone) that returns them. A `compute_loss` that returns no outputs, or outputs of a second forward without
    gradients (TRL's `SFTTrainer` scores tokens with a fused head that returns no hidden states, and runs a second,
    no-grad forward for the logits), still has its regularized states taken from the forward that trains.
    """

    source = "hidden_states"

    def __init__(self, model: nn.Module | None = None):
        self._force_dict = model is not None and _accepts(model, "return_dict")
        self._config_wants_tuple = getattr(getattr(model, "config", None), "return_dict", True) is False
        self._wants_tuple = False
        self._active = False
        self._recorded: list[tuple[str, Any]] | None = None
        self._warned_missing: set[str] = set()
        self._handles = [module.register_forward_hook(self._record) for module in _models_returning_states(model)]

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active and self._recorded is None:
            self._recorded = _hidden_states_of(output)

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        prepared = {**inputs, "output_hidden_states": True}
        if self._force_dict:
            asked = inputs.get("return_dict")
            self._wants_tuple = asked is False or (asked is None and self._config_wants_tuple)
            prepared["return_dict"] = True
        return prepared

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self._active, self._recorded = True, None
        try:
            yield
        finally:
            self._active = False

    def collect(self, outputs: Any = None) -> tuple[list[torch.Tensor], list[str]]:
        """The hidden states and their names (`hidden_states.<i>`, or `encoder_hidden_states.<i>` then
        `decoder_hidden_states.<i>`): those in `outputs`, or those recorded from the first forward when `outputs` has
        none, or has them without gradients where the recorded ones have gradients. A `None` among them (a layer that
        returned no state) is left out, its name logged once; the names of the others keep their index."""
        recorded, self._recorded = self._recorded, None
        found = _hidden_states_of(outputs)
        if recorded is not None and (found is None or (_requires_grad(recorded) and not _requires_grad(found))):
            found = recorded
        activations, names, missing = [], [], []
        for key, states in found or []:
            for i, state in enumerate(states):
                if state is None:
                    missing.append(f"{key}.{i}")
                    continue
                activations.append(state)
                names.append(f"{key}.{i}")
        new = [name for name in missing if name not in self._warned_missing]
        if new:
            self._warned_missing.update(new)
            logger.warning(
                f"The model returned None for {', '.join(new)} among its hidden states: left out of LBE (said once)."
            )
        return activations, names

    def restore(self, outputs: Any, keep_hidden_states: bool = False) -> Any:
        """`outputs` as the caller would have had them: without the hidden states we asked for (unless it asked for
        them too), and as a tuple where it asked for one."""
        if isinstance(outputs, dict) and not keep_hidden_states and any(outputs.get(k) is not None for k in HIDDEN_STATE_KEYS):
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in HIDDEN_STATE_KEYS})
        if self._wants_tuple and hasattr(outputs, "to_tuple"):
            outputs = outputs.to_tuple()
        return outputs

    def remove(self) -> None:
        """Remove the recording hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _models_returning_states(model: nn.Module | None) -> list[nn.Module]:
    """The modules whose outputs may carry the hidden states: the model, the model under a PEFT wrapper, and its
    backbone (`base_model`), each once."""
    if model is None:
        return []
    chain = [model]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    chain.append(inner)
    backbone = getattr(inner, "base_model", None)
    if isinstance(backbone, nn.Module):
        chain.append(backbone)
    unique: list[nn.Module] = []
    for module in chain:
        if not any(module is seen for seen in unique):
            unique.append(module)
    return unique


class ForwardHookCapture:
    """Regularize the outputs of chosen submodules, recorded by forward hooks.

    A module called several times per forward (a shared activation) contributes one activation per call. A module
    whose output was computed without gradients inside a forward with gradients is an error (reentrant checkpointing).
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
        self._grad_enabled = False  # whether the forward inside `capturing()` computes gradients
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
            if self._grad_enabled and not torch.is_grad_enabled():
                raise RuntimeError(
                    f"The output of {name!r} ({type(module).__name__}) was computed without gradients inside a training "
                    "forward, so LBE's gradient cannot reach the layers before it. Reentrant gradient checkpointing does "
                    "this (it runs the checkpointed blocks under no_grad and recomputes them in the backward): use "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}, or leave the module out of "
                    "lbe_target_modules."
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
        self._active, self._grad_enabled = True, torch.is_grad_enabled()
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
    def restore(outputs: Any, keep_hidden_states: bool = False) -> Any:
        return outputs

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


Capture = HiddenStatesCapture | ForwardHookCapture


def select_capture(
    model: nn.Module,
    target_modules: Any,
    probe: Callable[[Capture], tuple[list[torch.Tensor], list[str]]],
) -> tuple[Capture, list[torch.Tensor], list[str]]:
    """Choose where the regularized activations of `model` come from: the one place that decides.

    1. `target_modules` given: forward hooks on those modules;
    2. else a Transformers model whose `forward` takes `output_hidden_states`: its `hidden_states`, if a forward
       returns any;
    3. else forward hooks on the default modules (`default_target_modules`).

    Args:
        model: the unwrapped model (hooks go on its modules, its `forward` signature is read).
        target_modules: `lbe_target_modules` (see `resolve_target_modules`).
        probe: runs one forward of the model (wrapped as needed) with a capture, as
            `capture.collect(model(**capture.prepare_inputs(batch)))` inside `capture.capturing()`, and returns the
            `(activations, names)` it collected.

    Returns:
        The capture, and the activations and layer names of the probe's forward.
    """
    if target_modules is None and accepts_hidden_states(model):
        capture = HiddenStatesCapture(model)
        try:
            activations, names = probe(capture)
        except TypeError as err:  # a forward that passes **kwargs on to a function that does not take them
            if "output_hidden_states" not in str(err) and "return_dict" not in str(err):
                raise
            activations, names = [], []
        if activations:
            logger.info(f"Batch-entropy layers: {_describe(names)} (hidden_states).")
            return capture, activations, names
        capture.remove()
        logger.warning(
            f"{type(model).__name__} returned no hidden_states with output_hidden_states=True; regularizing the "
            "outputs of its activation modules instead (set lbe_target_modules to choose)."
        )
    capture = ForwardHookCapture(resolve_target_modules(model, target_modules))
    activations, names = probe(capture)
    if not activations:
        capture.remove()
        raise ValueError(
            f"None of the modules chosen for LBE ({', '.join(capture.module_names[:10])}) ran in the forward pass. "
            "Check lbe_target_modules."
        )
    (logger.warning if target_modules is None else logger.info)(
        f"Batch-entropy layers: {_describe(names)} (forward_hooks)."
    )
    return capture, activations, names


def _describe(names: Sequence[str]) -> str:
    return f"{len(names)} layers: {', '.join(names[:8])}{' ... ' + names[-1] if len(names) > 8 else ''}"
