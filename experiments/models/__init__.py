"""Vanilla deep networks (no skip connections, no normalization, no dropout) as Transformers models: the MLP and CNN
classifiers, and the fully connected autoencoder (`AutoModel`, `AutoConfig.for_model("dense_autoencoder", depth=50)`).
The experiments train them; they are research code of this repository, not part of the installed library.

Importing this package registers them with the Auto classes, so that

    AutoConfig.for_model("vanilla_mlp", depth=500, width=64)
    AutoModelForImageClassification.from_config(config)
    AutoModelForImageClassification.from_pretrained(folder)

work in this process, and marks them with `register_for_auto_class`, so that `save_pretrained` / `push_to_hub` copy
`configuration_vanilla.py` and `modeling_vanilla.py` next to the weights and write an `auto_map`: the folder (or Hub
repository) then loads anywhere with `AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)`,
without this repository. From a clone, `python -m hf_batch_entropy.diagnosis FOLDER` imports this package (it is
on `sys.path` when run from the repository root), so such a folder is diagnosed without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_autoencoder import DenseAutoencoderConfig
from .configuration_vanilla import VanillaCNNConfig, VanillaMLPConfig
from .modeling_autoencoder import AutoencoderOutput, DenseAutoencoderModel, DenseAutoencoderPreTrainedModel
from .modeling_vanilla import (
    VanillaCNNForImageClassification,
    VanillaCNNPreTrainedModel,
    VanillaMLPForImageClassification,
    VanillaMLPPreTrainedModel,
)

__all__ = [
    "AutoencoderOutput",
    "DenseAutoencoderConfig",
    "DenseAutoencoderModel",
    "DenseAutoencoderPreTrainedModel",
    "VanillaCNNConfig",
    "VanillaCNNForImageClassification",
    "VanillaCNNPreTrainedModel",
    "VanillaMLPConfig",
    "VanillaMLPForImageClassification",
    "VanillaMLPPreTrainedModel",
    "build_vanilla_model",
]

for _config_cls, _model_cls in (
    (VanillaMLPConfig, VanillaMLPForImageClassification),
    (VanillaCNNConfig, VanillaCNNForImageClassification),
):
    # exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail.
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForImageClassification.register(_config_cls, _model_cls, exist_ok=True)
    _config_cls.register_for_auto_class()
    _model_cls.register_for_auto_class("AutoModelForImageClassification")

# The autoencoder has no task head: it loads with AutoModel.
AutoConfig.register(DenseAutoencoderConfig.model_type, DenseAutoencoderConfig, exist_ok=True)
AutoModel.register(DenseAutoencoderConfig, DenseAutoencoderModel, exist_ok=True)
DenseAutoencoderConfig.register_for_auto_class()
DenseAutoencoderModel.register_for_auto_class("AutoModel")


def build_vanilla_model(
    arch: str,
    depth: int,
    width: int,
    *,
    num_channels: int = 1,
    image_size: int = 8,
    num_labels: int = 10,
    activation: str = "relu",
    **config_kwargs,
) -> VanillaMLPForImageClassification | VanillaCNNForImageClassification:
    """A freshly initialized vanilla network: `arch` "mlp" (width = units per layer) or "cnn" (width = channels)."""
    common = dict(
        depth=depth,
        activation=activation,
        num_channels=num_channels,
        image_size=image_size,
        num_labels=num_labels,
        **config_kwargs,
    )
    if arch == "mlp":
        return VanillaMLPForImageClassification(VanillaMLPConfig(width=width, **common))
    if arch == "cnn":
        return VanillaCNNForImageClassification(VanillaCNNConfig(channels=width, **common))
    raise ValueError(f"Unknown vanilla architecture {arch!r}: choose 'mlp' or 'cnn'.")
