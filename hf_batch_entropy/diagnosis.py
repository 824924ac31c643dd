r"""Trainability diagnosis before training: per-layer batch-entropy at initialization, and the layers where it is ~0.

Peer et al. (TMLR 2022) show that a network in which some layer's batch-entropy is 0, i.e. every example of the batch
is mapped to the same activation, cannot be trained by gradient descent: no information about the input reaches the
layers above, and no useful gradient reaches the layers below. This module measures, for a model and a few batches,

    H_l = mean_u ½·ln(π·e·σ_lu² + 1)      (σ_lu: unbiased std over the batch of unit u of layer l)

for every layer `l` (the model's `hidden_states`, else the outputs of its activation modules, exactly the layers
`BatchEntropyTrainer` would regularize), averaged over the batches, and flags the layers with `H_l < threshold`.

Threshold. A dead layer's entropy is not exactly 0 but sits at a floor set by floating point rounding: its activations
differ across the batch only by rounding errors, `σ ≈ ε·|a|` (ε = 1.2e-7 in float32), so `H ≈ ½·π·e·σ² ≈ 1e-17`
nats for activations of magnitude ~0.1. The default threshold, `1e-13` nats for float32 activations (`σ ≈ 1.5e-7`,
the resolution of float32 for activations of order 1), sits between that floor and what still trains. Measured on
digits (ReLU MLP of width 64, PyTorch's default init; trained without LBE with Adam, lr 1e-3, 400 steps): at
initialization the entropy falls ~5× per layer; depth 6 reaches 91% test accuracy and depth 10 75% (not flagged),
depth 15 75% (its deepest layer at 3e-12 to 7e-13 depending on the seed, not flagged), depth 20 25% (flagged from
layer ~16), depth 30 stays at chance (flagged from layer ~16; floor 1e-17). For half-precision activations the floor
is higher, so the default scales with the squared machine epsilon of the activations' dtype (bf16: 4e-4,
fp16: 7e-6). Pass `threshold=` / `--threshold` to choose another one.

From Python:

    >>> from hf_batch_entropy import diagnose
    >>> report = diagnose(VanillaMLPConfig(depth=500, width=64))    # a config, a model, or a Hub name / local path
    >>> report.flagged[:3], report.suggested_settings
    >>> print(report)

From the command line:

    python -m hf_batch_entropy.diagnosis --vanilla mlp --depth 500 --width 64
    python -m hf_batch_entropy.diagnosis bert-base-uncased             # Hub name (or a local folder)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import select_capture
from .denormals import flush_denormals
from .entropy import batch_entropies

__all__ = ["DEFAULT_THRESHOLD", "Diagnosis", "default_threshold", "diagnose", "digits_batches", "main", "text_batches"]

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

# Fixed sentences for text models: long enough to fill `text_max_length` tokens without padding, varied in content.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch.",
    "Deep networks without skip connections are hard to train because information vanishes with depth.",
    "She bought three apples, two pears and a loaf of fresh bread at the market on Saturday morning.",
    "The committee postponed its decision on the new budget until the auditors finish their report.",
    "Rain is expected across the northern regions tonight, with strong winds along the coast tomorrow.",
    "He learned to play the violin as a child and still practices for an hour every single evening.",
    "The spacecraft entered orbit around the distant moon after a journey that lasted seven long years.",
    "Batch entropy measures how much the activations of a layer vary across the examples of a batch.",
    "Our small team shipped the release on time, although two of the tests were flaky all week long.",
    "The museum reopened its ancient history wing with a collection of coins, pottery and old maps.",
    "A warm cup of tea and a good book make a quiet winter afternoon feel surprisingly short to me.",
    "The river flooded the valley in spring, and the villagers rebuilt the bridge with stone and oak.",
    "Researchers found that the new vaccine was safe and effective in a trial with ten thousand people.",
    "Please remember to lock the door, switch off the lights and feed the cat before you leave today.",
    "The orchestra played the symphony so softly that the audience could hear the rain on the roof.",
    "Stock markets fell sharply on Monday after the central bank announced an unexpected rate rise.",
)


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
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


def digits_batches(
    num_batches: int = 4,
    batch_size: int = 64,
    num_channels: int = 1,
    image_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Batches of scikit-learn's bundled 8×8 digits (no download), standardized, resized to `image_size` (bilinear)
    and repeated over `num_channels`: `[{"pixel_values": (B, C, S, S)}, ...]`. Any image model can take them."""
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    gen = torch.Generator().manual_seed(seed)
    needed = num_batches * batch_size
    if needed > len(x):
        raise ValueError(f"digits has {len(x)} images; asked for {num_batches}×{batch_size}.")
    x = x[torch.randperm(len(x), generator=gen)[:needed]]
    if image_size != 8:
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, num_channels, -1, -1).contiguous()
    return [{"pixel_values": b} for b in x.split(batch_size)]


def text_batches(tokenizer, num_batches: int = 1, batch_size: int = 16, max_length: int = 16) -> list[dict[str, Any]]:
    """Fixed English sentences through `tokenizer`, truncated/padded to `max_length` tokens (the sentences are long
    enough that no padding is needed)."""
    if batch_size < 2:
        raise ValueError("Batch-entropy needs at least 2 examples per batch.")
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(num_batches * batch_size)]
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers (GPT-2, Llama) have no pad token
    batches = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def _is_vision_config(config) -> bool:
    return hasattr(config, "num_channels") and hasattr(config, "image_size") and not hasattr(config, "vocab_size")


def load_model(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    pretrained: bool = False,
) -> tuple[nn.Module, Any]:
    """A model from the Hub or a local folder, **freshly initialized from its config** by default (that is what
    "at initialization" means), or with its trained weights when `pretrained=True`. Returns `(model, tokenizer or None)`.

    Vision configs load an `AutoModelForImageClassification` (falling back to `AutoModel`); text configs an `AutoModel`
    and its tokenizer.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoTokenizer

    # Importing our vanilla models registers them with the Auto classes, so their folders load without remote code.
    from . import models  # noqa: F401

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    tokenizer = None
    vision = _is_vision_config(config)
    auto_classes = (AutoModelForImageClassification, AutoModel) if vision else (AutoModel,)
    error: Exception | None = None
    for auto in auto_classes:
        try:
            if pretrained:
                model = auto.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
            else:
                model = auto.from_config(config, trust_remote_code=trust_remote_code)
            break
        except (ValueError, KeyError) as err:  # config not mapped for this auto class
            error = err
    else:
        raise ValueError(f"Could not build a model for {name_or_path!r} ({type(config).__name__}): {error}")
    if not vision:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    return model, tokenizer


def _model_from_config(config) -> nn.Module:
    from transformers import AutoModel, AutoModelForImageClassification

    from . import models  # noqa: F401  (registers the vanilla configs)

    try:
        return AutoModelForImageClassification.from_config(config)
    except ValueError:
        return AutoModel.from_config(config)


def _default_batches(model: nn.Module, tokenizer, num_batches: int, batch_size: int, seed: int) -> list[dict]:
    config = getattr(model, "config", None)
    if tokenizer is not None:
        # One batch of the fixed sentences: more batches would only repeat them.
        return text_batches(tokenizer, num_batches=1, batch_size=min(batch_size, len(SENTENCES)))
    if config is not None and _is_vision_config(config):
        size = config.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return digits_batches(num_batches, batch_size, config.num_channels, size, seed)
    raise ValueError(
        f"Don't know what inputs {type(model).__name__} takes: pass `batches` (a list of input dicts, or of tensors for "
        "a plain nn.Module), or a `tokenizer` for a text model."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Diagnosis
# ----------------------------------------------------------------------------------------------------------------------


def suggest_settings(entropies: torch.Tensor, flagged: Sequence[int], pretrained: bool) -> tuple[dict[str, Any], str]:
    """LBE settings to start from, following the paper's two regimes."""
    num_layers = len(entropies)
    if flagged:
        # Training from scratch through dead layers: the paper's vanilla-network settings (α₀ = 2, α_min = 0.2), with
        # the β, learning rate and schedule measured on the depth-500 digits MLP (docs/vanilla.md).
        settings = {
            "lbe_beta": 0.5,
            "lbe_alpha": 2.0,
            "lbe_alpha_min": 0.2,
            "learning_rate": 2e-3,
            "lr_scheduler_type": "polynomial",
            "lr_scheduler_kwargs": {"power": 2.0},
            "max_grad_norm": 1.0,
        }
        advice = (
            f"{len(flagged)} of {num_layers} layers carry no information about the input at initialization. Train "
            "with BatchEntropyTrainer: LBE restores the flow layer by layer, from the input side, before the task "
            "loss can fall (about 1.6 layers per optimizer step on the depth-500 MLP at lr 2e-3; keep gradient "
            "clipping on, without it the revived layers collapsed again at lr 1e-3). See docs/vanilla.md."
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


@torch.no_grad()
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
            sentences through the tokenizer for text models.
        threshold: layers with entropy below it (nats per unit) are flagged. Default: `default_threshold` of the
            activations' dtype (1e-13 for float32). See the module docstring.
        target_modules: which layers to measure, as `BatchEntropyConfig.lbe_target_modules` (default: the model's
            `hidden_states`, else its activation modules).
        tokenizer: for a text model given as a module.
        num_batches, batch_size, seed: the default batches.
        trust_remote_code, pretrained: for names / paths.
        device: where to run (default: the model's device).

    Returns:
        A [`Diagnosis`]: `entropies` `(L,)`, `flagged` layer indices, `suggested_settings`; `print()` it for a table.
    """
    from transformers import PreTrainedConfig

    name = ""
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
        tokenizer = tokenizer or loaded_tokenizer
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
        batches = _default_batches(model, tokenizer, num_batches, batch_size, seed)
    batches = list(batches)
    if not batches:
        raise ValueError("diagnose() got no batches.")

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
        suggested_settings=settings,
        advice=advice,
    )


def _run(model: nn.Module, batch, capture, device) -> tuple[list[torch.Tensor], list[str]]:
    """One forward of `batch` (a dict of inputs, or a tensor passed positionally) with `capture`."""
    with capture.capturing():
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
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_batch_entropy.diagnosis",
        description="Trainability diagnosis: per-layer batch-entropy at initialization, and the layers where it is ~0 "
        "(information flow broken; Peer et al., TMLR 2022), with suggested LBE settings.",
        epilog="Examples:\n  python -m hf_batch_entropy.diagnosis --vanilla mlp --depth 500 --width 64\n"
        "  python -m hf_batch_entropy.diagnosis bert-base-uncased\n"
        "  python -m hf_batch_entropy.diagnosis ./my_model --pretrained",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="Hub model name or local folder (omit with --vanilla).")
    parser.add_argument("--vanilla", choices=["mlp", "cnn"], help="Diagnose a fresh vanilla network instead.")
    parser.add_argument("--depth", type=int, default=500, help="Vanilla network depth (default 500).")
    parser.add_argument("--width", type=int, default=64, help="Vanilla MLP width / CNN channels (default 64).")
    parser.add_argument("--activation", default="relu", help="Vanilla network activation (default relu).")
    parser.add_argument("--image_size", type=int, default=8, help="Vanilla network input size (default 8, digits).")
    parser.add_argument("--pretrained", action="store_true", help="Load the trained weights instead of a fresh init.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom modeling code from the Hub.")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"Flag layers with batch-entropy below this, in nats (default {DEFAULT_THRESHOLD:g} for "
                        "float32 activations, scaled by the squared machine epsilon for half precision).")
    parser.add_argument("--target_modules", nargs="+", default=None,
                        help="Measure these modules' outputs (names, suffixes or re:<regex>) instead of hidden_states.")
    parser.add_argument("--num_batches", type=int, default=4, help="Batches to average over (default 4).")
    parser.add_argument("--batch_size", type=int, default=64, help="Examples per batch (default 64; text models: one batch of at most 16 fixed sentences).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialization and of the batches.")
    parser.add_argument("--device", default=None, help="Device, e.g. cuda (default: cpu).")
    parser.add_argument("--max_rows", type=int, default=40, help="Rows of the table (0: all layers).")
    parser.add_argument("--json", action="store_true", help="Print the diagnosis as JSON instead of a table.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Exit status: 0 when every layer passes, 1 when some layer is flagged, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.vanilla is None):
        parser.error("give either a model name/path or --vanilla mlp|cnn")
    if args.vanilla is not None:
        from .models import VanillaCNNConfig, VanillaMLPConfig

        common = dict(depth=args.depth, activation=args.activation, image_size=args.image_size)
        config = (
            VanillaMLPConfig(width=args.width, **common)
            if args.vanilla == "mlp"
            else VanillaCNNConfig(channels=args.width, **common)
        )
        target: Any = config
    else:
        target = args.model
    # Subnormal floats in deep dead networks slow CPU arithmetic down (docs/vanilla.md); they are ~0 anyway.
    flush_denormals()
    try:
        report = diagnose(
            target,
            threshold=args.threshold,
            target_modules=args.target_modules,
            num_batches=args.num_batches,
            batch_size=args.batch_size,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            pretrained=args.pretrained,
            device=args.device,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format(max_rows=args.max_rows or None))
    return 0 if report.trainable else 1


if __name__ == "__main__":
    sys.exit(main())
