"""The model to diagnose, from a config, a module, or a Hub name / local folder, and its default inputs.

Default inputs: scikit-learn's digits for an image model, fixed sentences through the model's tokenizer for a text
model, and, for a text model without a usable tokenizer (a folder saved without one, as `trainer.save_model()` writes
it when the trainer had no `processing_class`), random token ids from its config's vocabulary. The report says which.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .clone import CLONE_HINT, RESEARCH_MODEL_TYPES, experiment_models
from .inputs import SENTENCES, digits_batches, random_token_batches, text_batches

__all__ = ["ProbeInputsError", "load_model", "load_tokenizer"]


class ProbeInputsError(ValueError):
    """The diagnosis cannot make inputs for a model. `str()` says what to do from Python; `cli_message` says it with
    the command line's flags."""

    def __init__(self, problem: str, python_fix: str, cli_fix: str):
        super().__init__(f"{problem} {python_fix}")
        self.cli_message = f"{problem} {cli_fix}"


def _is_vision_config(config) -> bool:
    return hasattr(config, "num_channels") and hasattr(config, "image_size") and not hasattr(config, "vocab_size")


def load_model(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    pretrained: bool = False,
    tokenizer: str | None = None,
) -> tuple[nn.Module, Any]:
    """A model from the Hub or a local folder, **freshly initialized from its config** by default (that is what
    "at initialization" means), or with its trained weights when `pretrained=True`. Returns `(model, tokenizer or None)`.

    Vision configs load an `AutoModelForImageClassification` (falling back to `AutoModel`); text configs an `AutoModel`
    and a tokenizer: `tokenizer` (a Hub name or folder) if given, else the folder's own, else `None` (the folder has
    none that loads).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, PreTrainedConfig

    # From a clone, the experiments' vanilla and autoencoder models register with the Auto classes, so their folders
    # load without remote code.
    clone_models = experiment_models()
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as err:
        # The model type is not one transformers knows, or its config names modeling code of its own: say what to do
        # in words the command line and Python share.
        try:
            model_type = PreTrainedConfig.get_config_dict(name_or_path, revision=revision)[0].get("model_type")
        except (OSError, ValueError):
            raise err from None
        ours = clone_models is None and model_type in RESEARCH_MODEL_TYPES
        if ours or "trust_remote_code" in str(err):
            raise ValueError(
                f"{name_or_path}: its model type {model_type!r} needs modeling code that transformers does not have. "
                f"{CLONE_HINT + ' ' if ours else ''}"
                "If you trust the modeling code saved with the model, run it: --trust_remote_code on the command "
                "line, trust_remote_code=True from Python."
            ) from err
        raise
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
    if vision:
        return model, None
    if tokenizer is not None:
        return model, load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    try:
        return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, TypeError):  # no tokenizer files, or none transformers can build for this model
        return model, None


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """`AutoTokenizer.from_pretrained(name_or_path)`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)


def _model_from_config(config) -> nn.Module:
    from transformers import AutoModel, AutoModelForImageClassification

    experiment_models()  # from a clone: registers the vanilla configs
    try:
        return AutoModelForImageClassification.from_config(config)
    except ValueError:
        return AutoModel.from_config(config)


def _vocab_size(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) and size >= 2 else None


def _inputs_vary(batch: dict[str, Any] | torch.Tensor) -> bool:
    """Whether some input (masks aside) differs between the examples of `batch` (a batch of one is left to the
    estimator's own error)."""
    items = batch.items() if isinstance(batch, dict) else [("input", batch)]
    tensors = [x for key, x in items if isinstance(x, torch.Tensor) and x.dim() > 0 and "mask" not in key]
    return any(x.shape[0] < 2 or not bool((x == x[:1]).all()) for x in tensors)


def _default_batches(
    model: nn.Module, tokenizer, num_batches: int, batch_size: int, seed: int, *, tokenizer_given: bool = False
) -> tuple[list[dict], str]:
    """The default probe batches of `model`, and a line that says what they are (for the report).

    `tokenizer_given`: the tokenizer was asked for by name, so one that maps every sentence to the same tokens is an
    error; the model's own such tokenizer (a folder saved without one: transformers builds one without a vocabulary)
    gives way to random token ids."""
    config = getattr(model, "config", None)
    unusable = ""
    if tokenizer is not None:
        # One batch of the fixed sentences: more batches would only repeat them.
        size = min(batch_size, len(SENTENCES))
        batches = text_batches(tokenizer, num_batches=1, batch_size=size)
        if any(_inputs_vary(b) for b in batches):
            return batches, f"{size} fixed English sentences through the tokenizer"
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if tokenizer_given:
            raise ProbeInputsError(
                f"The tokenizer {name!r} maps the probe sentences to identical tokens (a tokenizer without a vocabulary?),"
                " so every batch-entropy would be 0 whatever the network.",
                "Pass another `tokenizer`, or none for random token ids.",
                "Give another one with --tokenizer NAME_OR_PATH, or leave --tokenizer out for random token ids.",
            )
        unusable = f" (no usable tokenizer: the one loaded from {name!r} maps every sentence to the same tokens)"
    if config is not None and _is_vision_config(config):
        size = config.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return digits_batches(num_batches, batch_size, config.num_channels, size, seed), "scikit-learn's digits"
    vocab = _vocab_size(config) if config is not None else None
    if vocab is not None:
        batches = random_token_batches(vocab, num_batches, batch_size, seed=seed)
        why = unusable or " (no tokenizer)"
        return batches, f"random token ids from the config's vocabulary of {vocab}{why}"
    raise ProbeInputsError(
        f"Don't know what inputs {type(model).__name__} takes: it is neither an image model (a config with "
        "num_channels and image_size) nor a text model with a vocabulary (vocab_size).",
        "Pass `batches` (a list of input dicts, or of tensors for a plain nn.Module).",
        "Diagnose it from Python with your own inputs: hf_batch_entropy.diagnose(model, batches=[...]).",
    )


# ----------------------------------------------------------------------------------------------------------------------
