"""Regularize a Transformers model's own `hidden_states` (`output_hidden_states=True`): `HiddenStatesCapture`."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from .base import Capture, forward_parameters, takes_keyword
from .watch import _ForwardWatch

logger = logging.getLogger(__name__)

HIDDEN_STATE_KEYS = ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")

# The keywords `HiddenStatesCapture` adds to a forward to ask it for its hidden states, by name.
ASKING_KEYWORDS = ("output_hidden_states", "return_dict")


def accepts_hidden_states(model: nn.Module) -> bool:
    """Whether `model` is a Transformers model whose `forward` takes `output_hidden_states` (by name or `**kwargs`).

    A PEFT model counts as its base model: its `forward` hands the keyword arguments on to it."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, PreTrainedModel) and takes_keyword(model, "output_hidden_states") and (
        base is model or takes_keyword(base, "output_hidden_states")
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


def models_returning_states(model: nn.Module | None) -> list[nn.Module]:
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


class HiddenStatesCapture(Capture):
    """Regularize the `hidden_states` a Transformers model returns with `output_hidden_states=True`.

    The forward is asked for a `ModelOutput` (`return_dict=True`) so that the hidden states can be found by name;
    `restore` hands the caller a tuple again where it asked for one (`return_dict=False` in the inputs or the config).

    The hidden states are recorded, inside `capturing()`, from the measured forward (see the package's docstring) of
    the model, or of its backbone, whichever returns them first. A `compute_loss` that returns no outputs, or outputs
    of another forward (TRL's fused LM head returns no hidden states, and a second, no-grad forward gives the logits),
    still has its regularized states taken from the forward that trains. That forward is asked for them through the
    batch (`prepare_inputs`), or, where the caller builds its own keywords (TRL's GRPO and RLOO), by a hook on the
    model that adds `output_hidden_states=True` to them.
    """

    source = "hidden_states"

    def __init__(self, model: nn.Module | None = None):
        self._model_name = type(model).__name__ if model is not None else "The model"
        self._force_dict = model is not None and takes_keyword(model, "return_dict")
        self._config_wants_tuple = getattr(getattr(model, "config", None), "return_dict", True) is False
        self._wants_tuple = False
        self._recorded: list[tuple[str, Any]] | None = None
        self._recorded_measured = False
        self._warned_missing: set[str] = set()
        # The recording hooks first: on the model itself they must run before the watch's hook ends its forward.
        chain = models_returning_states(model)
        handles = [module.register_forward_hook(self._record) for module in chain]
        watch = None
        if model is not None:
            backbone = chain[-1]
            # Where `output_hidden_states` would be passed positionally, it is not added as a keyword.
            params = [p.name for p in forward_parameters(backbone).values()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
            self._position = params.index("output_hidden_states") if "output_hidden_states" in params else None
            inject = self._inject if takes_keyword(backbone, "output_hidden_states") else None
            watch = _ForwardWatch(model, inner=backbone, inject=inject)
        super().__init__(watch)
        self._handles += handles

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

    def _begin(self) -> None:
        self._recorded, self._recorded_measured = None, False

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

    def discard(self) -> None:
        self._recorded = None

    def restore(self, outputs: Any, keep_hidden_states: bool = False) -> Any:
        """`outputs` as the caller would have had them: without the hidden states we asked for (unless it asked for
        them too), and as a tuple where it asked for one."""
        if isinstance(outputs, dict) and not keep_hidden_states and any(outputs.get(k) is not None for k in HIDDEN_STATE_KEYS):
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in HIDDEN_STATE_KEYS})
        if self._wants_tuple and hasattr(outputs, "to_tuple"):
            outputs = outputs.to_tuple()
        return outputs
