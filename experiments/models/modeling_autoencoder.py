"""A deep fully connected autoencoder as a Transformers model: [`DenseAutoencoderModel`].

The paper's autoencoder family (Peer et al., TMLR 2022): a vanilla encoder (Linear + activation layers), a linear
code, a mirrored vanilla decoder and a sigmoid output, no skip connections, normalization or dropout, PyTorch's
default initialization. Deep ones collapse like the vanilla classifiers: every input maps to the same code, and the
decoder can only learn the mean image.

With `output_hidden_states=True` the model returns, in order, every encoder layer's output, the code, and every
decoder layer's output (2·depth + 1 tensors), so LBE regularizes both halves and the code by default, as the paper's
reference autoencoder does. Each hidden layer keeps its activation as a module (`encoder.<i>.act`,
`decoder.<i>.act`), so forward hooks (`lbe_target_modules`) can choose other sets, e.g. the encoder only.

This file is copied next to the weights by `save_pretrained` (the classes are registered with
`register_for_auto_class`) and loaded with `trust_remote_code=True` where `hf_batch_entropy` is not installed: it may
import only torch, transformers and its sibling configuration file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_autoencoder import DenseAutoencoderConfig

__all__ = ["AutoencoderOutput", "DenseAutoencoderModel", "DenseAutoencoderPreTrainedModel"]


@dataclass
class AutoencoderOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): mean squared reconstruction error over pixels and batch.
        reconstruction (`torch.FloatTensor` of shape `(B, num_channels, image_size, image_size)`): x̂, in (0, 1).
        code (`torch.FloatTensor` of shape `(B, code_size)`): the code z.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the encoder layers' outputs, the code, the decoder
            layers' outputs (2·depth + 1 tensors of shape `(B, width)` or `(B, code_size)`).
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    code: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class AutoencoderDenseLayer(GradientCheckpointingLayer):
    """One hidden layer: `act(dense(x))`, (B, in_features) -> (B, out_features)."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        # A module (not a functional call) so that forward hooks can capture each layer's activation.
        self.act = ACT2FN[activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden_states))


class DenseAutoencoderPreTrainedModel(PreTrainedModel):
    config_class = DenseAutoencoderConfig
    config: DenseAutoencoderConfig
    base_model_prefix = "autoencoder"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["AutoencoderDenseLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # The paper's setting: PyTorch's default init (kaiming_uniform(a=√5), U(±1/√fan_in) biases), not Transformers'
        # normal(0, 0.02). `reset_parameters` goes through the guarded torch.nn.init functions, so weights loaded by
        # `from_pretrained` are left untouched.
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    def get_input_embeddings(self) -> None:
        # Pixels go straight into the first layer: there is no embedding table.
        return None


class DenseAutoencoderModel(DenseAutoencoderPreTrainedModel):
    r"""
    A vanilla fully connected autoencoder (see [`DenseAutoencoderConfig`]):

        e_l = act(W_l e_{l-1} + b_l)  (encoder, depth layers)  →  z = W_z e_depth + b_z  →
        d_l = act(V_l d_{l-1} + c_l)  (decoder, depth layers)  →  x̂ = sigmoid(V_out d_depth + c_out)

    `loss` = mean((x̂ − x)²) over pixels and batch, always computed (the target is the input itself); `labels`, if a
    collator passes them, are ignored.
    """

    def __init__(self, config: DenseAutoencoderConfig):
        super().__init__(config)
        w = config.width
        self.encoder = nn.ModuleList(
            AutoencoderDenseLayer(config.input_dim if i == 0 else w, w, config.activation) for i in range(config.depth)
        )
        self.to_code = nn.Linear(w, config.code_size)
        self.decoder = nn.ModuleList(
            AutoencoderDenseLayer(config.code_size if i == 0 else w, w, config.activation) for i in range(config.depth)
        )
        self.to_pixels = nn.Linear(w, config.input_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The code z of `pixel_values` (B, C, S, S) or (B, D): (B, code_size)."""
        return self(pixel_values).code

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AutoencoderOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, num_channels, image_size, image_size)` or `(B, input_dim)`):
                Images with values in [0, 1] (the reconstruction is a sigmoid).
            output_hidden_states (`bool`, *optional*): return every hidden layer's output and the code.
            return_dict (`bool`, *optional*): return an `AutoencoderOutput` (default) instead of a tuple.
        """
        if pixel_values is None:
            raise ValueError("DenseAutoencoderModel needs `pixel_values`.")
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
            raise TypeError(
                "DenseAutoencoderModel: pixel_values must be a floating point tensor, got "
                f"{getattr(pixel_values, 'dtype', type(pixel_values))}."
            )
        c, s = self.config.num_channels, self.config.image_size
        x = pixel_values.flatten(1)
        if x.shape[1] != self.config.input_dim:
            raise ValueError(
                f"DenseAutoencoderModel expects images of {c}×{s}×{s} = {self.config.input_dim} values per sample, got "
                f"pixel_values of shape {tuple(pixel_values.shape)}."
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        h = x
        for layer in self.encoder:
            h = layer(h)
            if hidden_states is not None:
                hidden_states.append(h)
        code = self.to_code(h)
        if hidden_states is not None:
            hidden_states.append(code)
        h = code
        for layer in self.decoder:
            h = layer(h)
            if hidden_states is not None:
                hidden_states.append(h)
        reconstruction = torch.sigmoid(self.to_pixels(h)).view(x.shape[0], c, s, s)
        # The task loss: mean squared error, >= 0, so LBE's term L·β·mean(lbe) is >= 0 too.
        loss = F.mse_loss(reconstruction.flatten(1), x)
        hidden = tuple(hidden_states) if hidden_states is not None else None
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (loss, reconstruction, code) + ((hidden,) if hidden is not None else ())
        return AutoencoderOutput(loss=loss, reconstruction=reconstruction, code=code, hidden_states=hidden)
