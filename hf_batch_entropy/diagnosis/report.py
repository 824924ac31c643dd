"""The diagnosis itself: per-layer batch-entropy at initialization, the flagged layers, suggested LBE settings."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import select_capture
from ..entropy import batch_entropies
from .loading import _default_batches, _inputs_vary, _model_from_config, load_model, load_tokenizer

__all__ = ["DEFAULT_THRESHOLD", "Diagnosis", "default_threshold", "diagnose", "suggest_settings"]

DEFAULT_THRESHOLD = 1e-13
"""Layers with batch-entropy below this (nats per unit, for float32 activations) are flagged: their activations differ
across the batch by little more than rounding errors, so information flow through them is broken."""


def default_threshold(dtype: torch.dtype) -> float:
    """`DEFAULT_THRESHOLD` for float32 activations, scaled by `(ε_dtype / ε_float32)²` for other float dtypes (the
    rounding floor of a dead layer's entropy scales with the squared machine epsilon)."""
    if not dtype.is_floating_point:
        return DEFAULT_THRESHOLD
    ratio = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    return DEFAULT_THRESHOLD * ratio * ratio


@dataclass
class Diagnosis:
    """The result of [`diagnose`].

    Attributes:
        layer_names: the measured layers, input side first.
        entropies: mean batch-entropy of each layer over the batches, `(L,)` float32, nats per unit.
        threshold: layers with entropy below it are flagged.
        flagged: indices of the flagged layers.
        source: where the activations came from: "hidden_states" or "forward_hooks".
        batch_size: examples per batch; num_batches: batches measured.
        inputs: what the batches were (digits, the fixed sentences, random token ids, or "given").
        suggested_settings: `BatchEntropyConfig` arguments to start from.
        advice: one-line explanation of the suggestion.
    """

    layer_names: list[str]
    entropies: torch.Tensor
    threshold: float
    flagged: list[int]
    source: str
    batch_size: int
    num_batches: int
    model_name: str = ""
    inputs: str = ""
    suggested_settings: dict[str, Any] = field(default_factory=dict)
    advice: str = ""

    @property
    def trainable(self) -> bool:
        """False when some layer's information flow is broken (entropy ~0): gradient descent alone will not train it."""
        return not self.flagged

    @property
    def first_flagged(self) -> int | None:
        return self.flagged[0] if self.flagged else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "source": self.source,
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "inputs": self.inputs,
            "threshold": self.threshold,
            "layers": [{"name": n, "entropy": float(h)} for n, h in zip(self.layer_names, self.entropies.tolist())],
            "flagged": [self.layer_names[i] for i in self.flagged],
            "trainable": self.trainable,
            "suggested_settings": self.suggested_settings,
            "advice": self.advice,
        }

    def format(self, max_rows: int | None = 40) -> str:
        """A table of every layer's entropy (the middle elided beyond `max_rows` layers) and the verdict."""
        h = self.entropies.tolist()
        rows = list(range(len(h)))
        if max_rows is not None and len(rows) > max_rows:
            # Keep the head, the tail and the transition into the flagged region: that is where the story is.
            keep = set(rows[: max_rows // 3]) | set(rows[-(max_rows // 3) :])
            if self.flagged:
                first = self.flagged[0]
                keep |= set(range(max(0, first - 3), min(len(h), first + 3)))
            rows = sorted(keep)
        width = max(len(n) for n in self.layer_names)
        lines = [
            f"Batch-entropy at initialization: {self.model_name or 'model'} ({len(h)} layers from {self.source}, "
            f"{self.num_batches} batch(es) of {self.batch_size})",
            *([f"Inputs: {self.inputs}."] if self.inputs else []),
            f"{'#':>4}  {'layer'.ljust(width)}  {'entropy (nats)':>14}",
        ]
        previous = -1
        for i in rows:
            if i != previous + 1:
                lines.append(f"{'...':>4}")
            mark = "  <- ~0: information flow broken" if i in self.flagged else ""
            lines.append(f"{i:>4}  {self.layer_names[i].ljust(width)}  {h[i]:>14.4g}{mark}")
            previous = i
        if previous != len(h) - 1:
            lines.append(f"{'...':>4}")
        lines.append("")
        if self.flagged:
            lines.append(
                f"FLAGGED: {len(self.flagged)}/{len(h)} layers have batch-entropy < {self.threshold:g} nats, from "
                f"layer {self.flagged[0]} ({self.layer_names[self.flagged[0]]}) on. Gradient descent alone is unlikely "
                "to train this network."
            )
        else:
            lines.append(f"OK: every layer has batch-entropy >= {self.threshold:g} nats (min {min(h):.4g}).")
        lines.append(self.advice)
        lines.append("Suggested BatchEntropyConfig settings: " + ", ".join(f"{k}={v}" for k, v in self.suggested_settings.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# ----------------------------------------------------------------------------------------------------------------------


def suggest_settings(entropies: torch.Tensor, flagged: Sequence[int], pretrained: bool) -> tuple[dict[str, Any], str]:
    """LBE settings to start from, following the paper's two regimes."""
    num_layers = len(entropies)
    if flagged:
        # Training from scratch through dead layers: the paper's vanilla-network settings (α₀ = 2, α_min = 0.2), with
        # the recipe of the frontier preset (experiments.frontier.arguments, measured in experiments/frontier/vanilla.md): a fast
        # revival at lr 1e-3 for 400 steps, then 0.3 × that rate. tests/test_train_vanilla.py keeps the two equal.
        settings = {
            "lbe_beta": 0.5,
            "lbe_alpha": 2.0,
            "lbe_alpha_min": 0.2,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "warmup_stable_decay",
            "lr_scheduler_kwargs": {"num_stable_steps": 400, "num_decay_steps": 100, "min_lr_ratio": 0.3},
            "max_grad_norm": 1.0,
        }
        advice = (
            f"{len(flagged)} of {num_layers} layers carry no information about the input at initialization. Train "
            "with BatchEntropyTrainer: LBE restores the flow layer by layer, from the input side, before the task "
            "loss can fall (the 500 layers of the depth-500 MLP in about 400 optimizer steps at lr 1e-3, after which "
            "a lower rate trains the task; keep gradient clipping on). The documentation's settings page explains these "
            "choices."
        )
    elif pretrained:
        settings = {"lbe_beta": 0.01, "lbe_alpha": 0.5, "lbe_alpha_min": 0.5, "lbe_alpha_learning_rate": 1e-3}
        advice = (
            "Information flows through every layer. For fine-tuning, LBE is a mild regularizer: the paper searched "
            "β ∈ {0.005, 0.01, 0.05} and α₀ ∈ {0.2, 0.3, 0.5, 0.8}."
        )
    else:
        alpha = round(float(entropies.median().clamp(min=0.2, max=2.0)), 2)
        settings = {"lbe_beta": 0.1, "lbe_alpha": alpha, "lbe_alpha_min": min(alpha, 0.5)}
        advice = (
            "Information flows through every layer: the network should train without LBE. To keep it that way, LBE "
            f"with targets near the current median entropy ({alpha} nats) is a gentle start."
        )
    return settings, advice


def diagnose(
    model_or_name_or_config: nn.Module | str | os.PathLike | Any,
    batches: Iterable[dict[str, Any] | torch.Tensor] | None = None,
    *,
    threshold: float | None = None,
    target_modules: Any = None,
    tokenizer: Any = None,
    num_batches: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    trust_remote_code: bool = False,
    pretrained: bool = False,
    device: str | torch.device | None = None,
) -> Diagnosis:
    """Per-layer batch-entropy of a model at initialization, and the layers where it is ~0.

    Args:
        model_or_name_or_config: an `nn.Module` (measured as it is), a `PreTrainedConfig` (a fresh model is built from
            it, e.g. `VanillaMLPConfig(depth=500)`), or a Hub name / local path (a fresh model from its config, or its
            trained weights with `pretrained=True`).
        batches: inputs, each a dict of model inputs (`{"pixel_values": (B, C, S, S)}`, `{"input_ids": ...}`) or a
            tensor (passed positionally). Default: `num_batches` batches of digits images for vision models, fixed
            sentences through the tokenizer for text models, or `num_batches` batches of random token ids from the
            config's vocabulary for a text model without a usable tokenizer (`Diagnosis.inputs` says which).
        threshold: layers with entropy below it (nats per unit) are flagged. Default: `default_threshold` of the
            activations' dtype (1e-13 for float32). See the module docstring.
        target_modules: which layers to measure, as `BatchEntropyConfig.lbe_target_modules` (default: the model's
            `hidden_states`, else its activation modules).
        tokenizer: a tokenizer, or the Hub name / folder of one, for a text model (default: the folder's own).
        num_batches: how many default batches.
        batch_size: examples per default batch.
        seed: the seed of the default batches and of a fresh initialization.
        trust_remote_code: for names / paths whose model needs its own modeling code.
        pretrained: load a name's / path's trained weights instead of a fresh initialization.
        device: where to run (default: the model's device).

    Returns:
        A [`Diagnosis`]: `entropies` `(L,)`, `flagged` layer indices, `suggested_settings`; `print()` it for a table.
    """
    from transformers import PreTrainedConfig

    name = ""
    tokenizer_given = tokenizer is not None
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer), trust_remote_code=trust_remote_code)
    if isinstance(model_or_name_or_config, nn.Module):
        model = model_or_name_or_config
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    elif isinstance(model_or_name_or_config, PreTrainedConfig):
        torch.manual_seed(seed)
        model = _model_from_config(model_or_name_or_config)
        name = f"{type(model).__name__}({_config_summary(model_or_name_or_config)})"
    elif isinstance(model_or_name_or_config, (str, os.PathLike)):
        path = os.fspath(model_or_name_or_config)
        torch.manual_seed(seed)
        model, loaded_tokenizer = load_model(path, trust_remote_code=trust_remote_code, pretrained=pretrained)
        tokenizer = tokenizer if tokenizer_given else loaded_tokenizer
        name = path + ("" if pretrained else " (fresh init)")
    else:
        raise TypeError(
            "diagnose() takes an nn.Module, a PreTrainedConfig, or a Hub name / local path, got "
            f"{type(model_or_name_or_config).__name__}."
        )
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    if device is not None:
        model = model.to(device)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    if batches is None:
        batches, inputs = _default_batches(model, tokenizer, num_batches, batch_size, seed, tokenizer_given=tokenizer_given)
    else:
        inputs = "given"
    batches = list(batches)
    if not batches:
        raise ValueError("diagnose() got no batches.")
    if not any(_inputs_vary(batch) for batch in batches):
        # Identical examples have zero batch-entropy in every layer by construction: a report would blame the network.
        raise ValueError(f"The probe inputs for {name} are identical across the batch, so every batch-entropy would be 0 "
                         "whatever the network. Pass `batches` of varied inputs.")

    was_training = model.training
    # Eval mode: the diagnosis is about the function the network computes; dropout noise would fake entropy.
    model.eval()
    capture = None
    sums: torch.Tensor | None = None
    try:
        for i, batch in enumerate(batches):
            if capture is None:
                capture, activations, names = select_capture(
                    model, target_modules, lambda c, batch=batch: _run(model, batch, c, device)
                )
            else:
                activations, _ = _run(model, batch, capture, device)
            size = activations[0].shape[0]
            if threshold is None:
                threshold = default_threshold(activations[0].dtype)
            h = batch_entropies(activations).cpu()
            if sums is not None and h.shape != sums.shape:
                raise ValueError(f"Batch {i} gave {len(h)} layers, the first gave {len(sums)}.")
            sums = h if sums is None else sums + h
    finally:
        if capture is not None:
            capture.remove()
        model.train(was_training)
    entropies = sums / len(batches)
    # NaN (e.g. an overflowed layer) is not healthy either.
    flagged = [i for i, v in enumerate(entropies.tolist()) if not v >= threshold]
    settings, advice = suggest_settings(entropies, flagged, pretrained)
    return Diagnosis(
        layer_names=names,
        entropies=entropies,
        threshold=threshold,
        flagged=flagged,
        source=capture.source,
        batch_size=size,
        num_batches=len(batches),
        model_name=name,
        inputs=inputs,
        suggested_settings=settings,
        advice=advice,
    )


def _run(model: nn.Module, batch, capture, device) -> tuple[list[torch.Tensor], list[str]]:
    """One forward of `batch` (a dict of inputs, or a tensor passed positionally) with `capture`, without an autograd
    graph: the diagnosis only reads the activations."""
    with torch.no_grad(), capture.capturing():
        if isinstance(batch, torch.Tensor):
            extra = capture.prepare_inputs({})
            outputs = model(batch.to(device), **extra)
        else:
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items()}
            inputs.pop("labels", None)
            outputs = model(**capture.prepare_inputs(inputs))
    return capture.collect(outputs)


def _config_summary(config) -> str:
    keys = ("depth", "width", "channels", "num_hidden_layers", "hidden_size", "activation")
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys if hasattr(config, k))


# ----------------------------------------------------------------------------------------------------------------------
