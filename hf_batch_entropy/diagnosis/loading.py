"""The model to diagnose, from a config, a module, or a Hub name / local folder, and its default inputs."""

from __future__ import annotations

from typing import Any

from torch import nn

from .inputs import SENTENCES, digits_batches, text_batches

__all__ = ["load_model"]


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
    from .. import models  # noqa: F401

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

    from .. import models  # noqa: F401  (registers the vanilla configs)

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
