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
its step.

**Which forward is measured.** A trainer's loss may run the model more than once: a reference forward under
`no_grad` (TRL's DPO on a PEFT model without `ref_model`), a second no-grad forward for logits or metrics (TRL's SFT
with `label_smoothing_factor` or `compute_loss_func`), a KL forward before the policy's (TRL's KTO). Both sources
measure one forward of the model per `capturing()` block, the same one: the first that computes gradients when the
block does (training), else the first (evaluation). Watched by hooks on the model itself (`_ForwardWatch`), which also
keep the keyword inputs of that forward (`inputs_seen`: its `attention_mask` is the one its activations have, whatever
the trainer's batch holds) and ask it for its hidden states where the caller built its own keywords. Activations
computed without gradients inside a block with gradients (a stop-gradient branch) are left out; inside reentrant
gradient checkpointing (which runs the checkpointed blocks under `no_grad` and recomputes them in the backward,
unseen) they are an error, since LBE's gradient could not reach the layers before them.

**Choosing the source** needs no forward of its own: `select_capture` decides from the model where it can, and
otherwise (a Transformers model that may or may not return hidden states) records both in the first forward it sees
and keeps one (`CaptureSelection`). So a trainer whose `compute_loss` gets batches that are not model keywords
(prompt and completion ids, advantages) is never re-run on them.

Which positions of the captured activations are real tokens is `tokens.py`'s concern, not this module's. A functional activation (`F.relu(x)` inside `forward`) has no module to hook: expose it as a module
(`self.act = nn.ReLU()`), or target the layer whose output you want (e.g. the `Linear` before it).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._compat import CONV_LAYERS
from ..config import REGEX_PREFIX, TargetModules

logger = logging.getLogger(__name__)

__all__ = [
    "CaptureSelection",
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


class _ForwardWatch:
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
        self.model = model
        self.inner = inner if inner is not None else model
        self.inject = inject
        self.inputs: dict[str, Any] | None = None
        self.inner_inputs: dict[str, Any] | None = None
        self._active = self._grad = self._current = self._done = False
        self._depth = 0
        self._calls = 0  # calls of the model in this block
        self._index = 0  # which call the measured forward was in the last block with gradients
        self._handles = [
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

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _inputs_seen(watch: _ForwardWatch | None, batch: dict[str, Any]) -> dict[str, Any]:
    return batch if watch is None else watch.inputs_seen(batch)


class HiddenStatesCapture:
    """Regularize the `hidden_states` a Transformers model returns with `output_hidden_states=True`.

    The forward is asked for a `ModelOutput` (`return_dict=True`) so that the hidden states can be found by name;
    `restore` hands the caller a tuple again where it asked for one (`return_dict=False` in the inputs or the config).

    The hidden states are recorded, inside `capturing()`, from the measured forward (see the module's docstring) of
    the model, or of its backbone, whichever returns them first. A `compute_loss` that returns no outputs, or outputs
    of another forward (TRL's fused LM head returns no hidden states, and a second, no-grad forward gives the logits),
    still has its regularized states taken from the forward that trains. That forward is asked for them through the
    batch (`prepare_inputs`), or, where the caller builds its own keywords (TRL's GRPO and RLOO), by a hook on the
    model that adds `output_hidden_states=True` to them.
    """

    source = "hidden_states"

    def __init__(self, model: nn.Module | None = None):
        self._model_name = type(model).__name__ if model is not None else "The model"
        self._force_dict = model is not None and _accepts(model, "return_dict")
        self._config_wants_tuple = getattr(getattr(model, "config", None), "return_dict", True) is False
        self._wants_tuple = False
        self._active = False
        self._recorded: list[tuple[str, Any]] | None = None
        self._recorded_measured = False
        self._warned_missing: set[str] = set()
        # The recording hooks first: on the model itself they must run before the watch's hook ends its forward.
        chain = _models_returning_states(model)
        self._handles = [module.register_forward_hook(self._record) for module in chain]
        self._watch = None
        if model is not None:
            backbone = chain[-1]
            # Where `output_hidden_states` would be passed positionally, it is not added as a keyword.
            params = [p.name for p in _forward_parameters(backbone).values()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
            self._position = params.index("output_hidden_states") if "output_hidden_states" in params else None
            inject = self._inject if _accepts(backbone, "output_hidden_states") else None
            self._watch = _ForwardWatch(model, inner=backbone, inject=inject)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._active or self._recorded is not None:
            return
        state = self._watch.state() if self._watch is not None else None
        if state is False:
            return  # another forward of the model (a reference, KL or metrics forward): not the measured one
        self._recorded = _hidden_states_of(output)
        self._recorded_measured = state is True

    def _inject(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Ask the measured forward's backbone for its hidden states where its caller did not (it built its own
        keywords: TRL's GRPO, RLOO and distillation)."""
        if kwargs.get("output_hidden_states") or (self._position is not None and len(args) > self._position):
            return kwargs
        return {**kwargs, "output_hidden_states": True}

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch to hand to the forward (or to the trainer that runs it): a new dict, asking for the hidden states
        (and a `ModelOutput`); what the trainer pops from it or adds stays out of `inputs`, which LBE reads."""
        prepared = {**inputs, "output_hidden_states": True}
        if self._force_dict:
            asked = inputs.get("return_dict")
            self._wants_tuple = asked is False or (asked is None and self._config_wants_tuple)
            prepared["return_dict"] = True
        return prepared

    @staticmethod
    def take_sources() -> None:
        """`None`: the hidden states are the backbone's, and `inputs_seen` holds the inputs they belong to."""
        return None

    def inputs_seen(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` updated with the keyword inputs of the last block's measured forward (the masks its activations
        have: TRL's GRPO builds `attention_mask` from the prompt's and the completion's); what it did not get (labels
        a trainer popped) stays the batch's."""
        return _inputs_seen(self._watch, batch)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self._active, self._recorded, self._recorded_measured = True, None, False
        if self._watch is not None:
            self._watch.begin(torch.is_grad_enabled())
        try:
            yield
        finally:
            self._active = False
            if self._watch is not None:
                self._watch.end()

    def collect(self, outputs: Any = None) -> tuple[list[torch.Tensor], list[str]]:
        """The hidden states and their names (`hidden_states.<i>`, or `encoder_hidden_states.<i>` then
        `decoder_hidden_states.<i>`): those recorded from the measured forward; else (a forward not watched, as in
        `nn.DataParallel`'s replicas) those in `outputs`, or those recorded from the first forward when `outputs` has
        none, or has them without gradients where the recorded ones have gradients. A `None` among them (a layer that
        returned no state) is left out, its name logged once; the names of the others keep their index."""
        recorded, self._recorded = self._recorded, None
        found = _hidden_states_of(outputs)
        if recorded is not None and (
            self._recorded_measured or found is None or (_requires_grad(recorded) and not _requires_grad(found))
        ):
            found = recorded
        activations, names, missing = [], [], []
        for key, states in found or []:
            if isinstance(states, torch.Tensor):
                # One tensor, not a tuple of layers: iterating it would measure the batch dimension as layers.
                raise ValueError(
                    f"{self._model_name} returned its {key} as one tensor of shape {tuple(states.shape)}, not as a "
                    "tuple of one tensor per layer (what Transformers models return with output_hidden_states=True), "
                    "so its layers cannot be told apart. Pass lbe_target_modules=[...] naming the layers to "
                    "regularize (they are then recorded by forward hooks)."
                )
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
        if self._watch is not None:
            self._watch.remove()


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


# The inputs a tower of a model starts from: tokens (whose padding `attention_mask` marks), or other modalities.
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")
_OTHER_INPUTS = ("pixel_values", "pixel_values_videos", "input_features", "input_values")


class _Towers:
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
        self._stack: list[tuple[dict[str, Any], bool]] = []
        self.active = False
        self._handles = []
        for name, module in model.named_modules():
            if not name:
                continue  # the model itself: its inputs are the batch's
            params = _forward_parameters(module)
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

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ForwardHookCapture:
    """Regularize the outputs of chosen submodules, recorded by forward hooks.

    A module called several times per forward (a shared activation) contributes one activation per call. With `model`
    given, only its measured forward is recorded (see the module's docstring); in a block with gradients, an output
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
        self._active = False
        self._activations: list[torch.Tensor] = []
        self._names: list[str] = []
        self._calls: dict[str, int] = {}
        self._left_out = 0  # outputs without gradients left out in the last block
        self._block = False  # a capturing() block ran since the last collect
        self._error: Exception | None = None  # found while recording, raised by collect
        self._grad_enabled = False  # whether the forward inside `capturing()` computes gradients
        self._sources: list[dict[str, Any] | None] = []
        self._collected_sources: list[dict[str, Any] | None] = []
        self._watch = _ForwardWatch(model, inner=_models_returning_states(model)[-1]) if model is not None else None
        self._towers = _Towers(model) if model is not None else None
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules]

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
        """The batch to hand to the forward (or to the trainer that runs it): a new dict, so that what the trainer pops
        from it (`labels`, for label smoothing) stays in `inputs`, which LBE reads."""
        return dict(inputs)

    def inputs_seen(self, batch: dict[str, Any]) -> dict[str, Any]:
        """See `HiddenStatesCapture.inputs_seen`."""
        return _inputs_seen(self._watch, batch)

    def take_sources(self) -> list[dict[str, Any] | None]:
        """Per activation the last `collect` handed over, the keyword inputs of the tower call that produced it
        (`_Towers.source`: the inputs its mask is read from), or `None` (the batch's); handed over and forgotten."""
        sources, self._collected_sources = self._collected_sources, []
        return sources

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self.discard()
        self._active, self._grad_enabled, self._block = True, torch.is_grad_enabled(), True
        if self._watch is not None:
            self._watch.begin(self._grad_enabled)
        if self._towers is not None:
            self._towers.begin()
        try:
            yield
        finally:
            self._active = False
            if self._watch is not None:
                self._watch.end()
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
        if not activations and block and self._watch is not None and self._watch.measured_ran:
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

    @staticmethod
    def restore(outputs: Any, keep_hidden_states: bool = False) -> Any:
        return outputs

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._watch is not None:
            self._watch.remove()
        if self._towers is not None:
            self._towers.remove()


class CaptureSelection:
    """Hidden states, or else forward hooks on the default modules, chosen at the first forward it records.

    For a Transformers model whose `forward` takes `output_hidden_states`, whether it returns any is known only from a
    forward: both captures record that first forward (the hooks keep references, no copies), `collect` keeps the
    hidden states where there are any, else the hooks' activations, and removes the other capture. From then on it is
    the chosen capture (`chosen`). No forward of its own: the first one the caller runs decides.
    """

    def __init__(self, model: nn.Module):
        self._model_name = type(model).__name__
        self._candidates: list[HiddenStatesCapture | ForwardHookCapture] = [HiddenStatesCapture(model)]
        defaults = default_target_modules(model)
        if defaults:
            self._candidates.append(ForwardHookCapture(defaults, model))
        self.chosen: HiddenStatesCapture | ForwardHookCapture | None = None

    @property
    def source(self) -> str:
        return (self.chosen or self._candidates[0]).source

    def take_sources(self) -> list[dict[str, Any] | None] | None:
        return (self.chosen or self._candidates[0]).take_sources()

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return (self.chosen or self._candidates[0]).prepare_inputs(inputs)

    def inputs_seen(self, batch: dict[str, Any]) -> dict[str, Any]:
        return (self.chosen or self._candidates[0]).inputs_seen(batch)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for capture in [self.chosen] if self.chosen is not None else self._candidates:
                stack.enter_context(capture.capturing())
            yield

    def collect(self, outputs: Any = None) -> tuple[list[torch.Tensor], list[str]]:
        if self.chosen is not None:
            return self.chosen.collect(outputs)
        hidden = self._candidates[0].collect(outputs)
        if hidden[0] or not self._candidates[0]._watch.measured_ran:
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
        logger.warning(
            f"{self._model_name} returned no hidden_states with output_hidden_states=True; regularizing the outputs "
            "of its activation modules instead (set lbe_target_modules to choose)."
        )
        self._choose(1)
        logger.warning(f"Batch-entropy layers: {_describe(hooks[1])} (forward_hooks).")
        return hooks

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
        for i, capture in enumerate(self._candidates):
            if i != index:
                capture.remove()
        self._candidates = [self.chosen]

    def restore(self, outputs: Any, keep_hidden_states: bool = False) -> Any:
        return (self.chosen or self._candidates[0]).restore(outputs, keep_hidden_states=keep_hidden_states)

    def remove(self) -> None:
        for capture in self._candidates:
            capture.remove()


Capture = HiddenStatesCapture | ForwardHookCapture | CaptureSelection


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
            kind = "activation modules" if any(_is_activation_module(m) for _, m in chosen) else "Linear/Conv layers"
            logger.warning(
                f"{type(model).__name__} returns no hidden states: regularizing the outputs of its {kind} "
                f"({_describe([name for name, _ in chosen])}; set lbe_target_modules to choose)."
            )
    if probe is None:
        return capture
    try:
        activations, names = probe(capture)
    except TypeError as err:  # a forward that passes **kwargs on to a function that does not take them
        if not isinstance(capture, CaptureSelection) or (
            "output_hidden_states" not in str(err) and "return_dict" not in str(err)
        ):
            raise
        capture.choose_hooks()
        activations, names = probe(capture)
    if isinstance(capture, CaptureSelection):
        capture = capture.chosen
    return capture, activations, names


def _describe(names: Sequence[str]) -> str:
    return f"{len(names)} layers: {', '.join(names[:8])}{' ... ' + names[-1] if len(names) > 8 else ''}"
