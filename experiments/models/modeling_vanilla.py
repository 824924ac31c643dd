"""Vanilla deep networks as Transformers models: [`VanillaMLPForImageClassification`] and
[`VanillaCNNForImageClassification`].

"Vanilla" as in Peer et al., "Improving the Trainability of Deep Neural Networks through Layerwise Batch-Entropy
Regularization" (TMLR 2022): no skip connections, no normalization, no dropout, PyTorch's default initialization. At
depth 500 the batch-entropy of the deep layers is 0 at initialization (every sample maps to the same activation), so
gradient descent cannot train them; layerwise batch-entropy regularization (LBE) can.

Each hidden layer is a module with its activation as an `nn.Module` attribute (`layers.<i>.act`), so forward hooks can
capture activations too. With `output_hidden_states=True` the models return one tensor per hidden layer: the
post-activation output (the input image is not included, unlike Transformers' text models that prepend embeddings).

This file is copied next to the weights by `save_pretrained` (the classes are registered with
`register_for_auto_class`) and loaded with `trust_remote_code=True` where `hf_batch_entropy` is not installed: it may
import only torch, transformers and its sibling configuration file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_vanilla import VanillaCNNConfig, VanillaMLPConfig

__all__ = [
    "VanillaCNNForImageClassification",
    "VanillaCNNPreTrainedModel",
    "VanillaMLPForImageClassification",
    "VanillaMLPPreTrainedModel",
]


class VanillaDenseLayer(GradientCheckpointingLayer):
    """One hidden layer of the MLP: `act(dense(x))`, (B, in_features) -> (B, out_features)."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        # A module (not a functional call) so that forward hooks can capture each layer's activation.
        self.act = ACT2FN[activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden_states))

    def has_hooks(self) -> bool:
        """Whether a module hook sits on this layer, its `dense` or its `act` (then the layer must run as modules)."""
        return any(
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
            for m in (self, self.dense, self.act)
        )

    def direct_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`forward` without the three module calls (for a layer with no hooks): the same operations, hence the same
        values and gradients bit for bit. (A fused addmm + ReLU, `torch._addmm_activation`, has no autograd formula.)"""
        hidden_states = F.linear(hidden_states, self.dense.weight, self.dense.bias)
        return torch.relu(hidden_states) if type(self.act) is nn.ReLU else self.act.forward(hidden_states)


def _global_module_hooks() -> bool:
    """Whether global module hooks (`torch.nn.modules.module.register_module_forward_hook` & co.) are registered."""
    from torch.nn.modules import module

    return bool(
        module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )


class VanillaConvLayer(GradientCheckpointingLayer):
    """One hidden layer of the CNN: `act(conv(x))`, same padding, (B, C_in, S, S) -> (B, C_out, S, S)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2)
        self.act = ACT2FN[activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(hidden_states))


@torch.no_grad()
def _delta_orthogonal_(weight: torch.Tensor, gain: float) -> None:
    """Xiao et al. (2018)'s delta-orthogonal kernel, in place: `weight` (C_out, C_in, k, k) is zero except its centre
    tap [:, :, k//2, k//2] = gain·Q, Q a random (semi-)orthogonal C_out × C_in matrix. Left as it is when it was
    loaded by `from_pretrained` (the flag `initialize_weights` checks, which the in-place writes here would bypass)."""
    if getattr(weight, "_is_hf_initialized", False):
        return
    centre = torch.empty(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
    nn.init.orthogonal_(centre, gain=gain)
    weight.zero_()
    weight[:, :, weight.shape[2] // 2, weight.shape[3] // 2] = centre


class _VanillaPreTrainedModel(PreTrainedModel):
    """Shared behaviour: the initialization (`config.initialization`) and the pixel_values checks."""

    base_model_prefix = "vanilla"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        # "default", the paper's setting, is PyTorch's own init (kaiming_uniform(a=√5) weights, U(±1/√fan_in)
        # biases), not Transformers' normal(0, 0.02) with zero biases: with zero biases and std 0.02 a deep vanilla
        # network collapses differently, and the depth-500 experiment would not be the paper's. The torch.nn.init
        # functions used here are guarded by `PreTrainedModel.initialize_weights`, so weights loaded by
        # `from_pretrained` are left untouched and only missing ones are (re)drawn.
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return
        scheme = self.config.initialization
        if scheme == "default":
            module.reset_parameters()
            return
        # "orthogonal" (MLP) / "delta_orthogonal" (CNN), see the configs: σ_w·Q weights, N(0, σ_b²) biases; the
        # classifier (no activation after it) gets gain 1.
        gain = 1.0 if module is getattr(self, "classifier", None) else float(self.config.init_gain)
        if isinstance(module, nn.Conv2d):
            _delta_orthogonal_(module.weight, gain)
        else:
            nn.init.orthogonal_(module.weight, gain=gain)
        if self.config.init_bias_std > 0:
            nn.init.normal_(module.bias, 0.0, float(self.config.init_bias_std))
        else:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> None:
        # Pixels go straight into the first layer: there is no embedding table. Transformers' default raises
        # NotImplementedError, which breaks callers that ask every model, e.g. accelerate's FSDP2 preparation.
        return None

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> torch.Tensor:
        if pixel_values is None:
            raise ValueError(f"{type(self).__name__} needs `pixel_values`.")
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}: pixel_values must be a floating point tensor, got "
                f"{getattr(pixel_values, 'dtype', type(pixel_values))}."
            )
        return pixel_values

    def _outputs(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        hidden_states: list[torch.Tensor] | None,
        return_dict: bool | None,
    ) -> ImageClassifierOutput | tuple:
        loss = None
        if labels is not None:
            # Mean cross-entropy over the batch, the task loss L_task of LBE.
            loss = F.cross_entropy(logits, labels.to(logits.device).long().view(-1))
        hidden_states = tuple(hidden_states) if hidden_states is not None else None
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


class VanillaMLPPreTrainedModel(_VanillaPreTrainedModel):
    config_class = VanillaMLPConfig
    config: VanillaMLPConfig
    _no_split_modules = ["VanillaDenseLayer"]


class VanillaMLPForImageClassification(VanillaMLPPreTrainedModel):
    r"""
    A vanilla multilayer perceptron classifier (see [`VanillaMLPConfig`]):

        h_0 = flatten(pixel_values)                  (B, num_channels·image_size²)
        h_l = act(W_l h_{l-1} + b_l),  l = 1…depth   (B, width)
        logits = W_out h_depth + b_out               (B, num_labels)

    `hidden_states` (when asked) is the tuple (h_1, …, h_depth): `config.depth` tensors of shape (B, width).
    """

    def __init__(self, config: VanillaMLPConfig):
        super().__init__(config)
        dims = [config.input_dim] + [config.width] * config.depth
        self.layers = nn.ModuleList(
            VanillaDenseLayer(dims[i], dims[i + 1], config.activation) for i in range(config.depth)
        )
        self.classifier = nn.Linear(config.width, config.num_labels)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, num_channels, image_size, image_size)` or `(B, input_dim)`):
                Images; flattened to `(B, num_channels·image_size²)`.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices; gives `loss` (cross-entropy).
            output_hidden_states (`bool`, *optional*): return the post-activation output of every hidden layer.
            return_dict (`bool`, *optional*): return an `ImageClassifierOutput` (default) instead of a tuple.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        x = pixel_values.flatten(1)
        if x.shape[1] != self.config.input_dim:
            raise ValueError(
                f"VanillaMLPForImageClassification expects images of {self.config.num_channels}×"
                f"{self.config.image_size}×{self.config.image_size} = {self.config.input_dim} values per sample, got "
                f"pixel_values of shape {tuple(pixel_values.shape)}."
            )
        hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        # Layers without hooks skip the module calls (~2 µs of Python per layer, ~1 ms of a ~15-19 ms forward at depth
        # 500 and width 64, measured): same operations, same results bit for bit. Hooked layers (e.g. LBE's forward-hook capture) and gradient
        # checkpointing go through the modules.
        direct = not (self.gradient_checkpointing and self.training) and not _global_module_hooks()
        for layer in self.layers:
            x = layer.direct_forward(x) if direct and not layer.has_hooks() else layer(x)
            if hidden_states is not None:
                hidden_states.append(x)
        logits = self.classifier(x)
        return self._outputs(logits, labels, hidden_states, return_dict)


class VanillaCNNPreTrainedModel(_VanillaPreTrainedModel):
    config_class = VanillaCNNConfig
    config: VanillaCNNConfig
    _no_split_modules = ["VanillaConvLayer", "VanillaDenseLayer"]


class VanillaCNNForImageClassification(VanillaCNNPreTrainedModel):
    r"""
    A vanilla convolutional classifier (see [`VanillaCNNConfig`]), as in the paper's reference implementation:

        h_0 = pixel_values                                (B, num_channels, S, S)
        h_l = act(conv_l(h_{l-1})),  l = 1…depth          (B, channels, S, S)     same padding, stride 1
        h_{depth+1} = act(W_fc flatten(h_depth) + b_fc)  (B, fc_size)
        logits = W_out h_{depth+1} + b_out               (B, num_labels)

    `hidden_states` (when asked) is (h_1, …, h_{depth+1}): `config.depth + 1` tensors, the convolutional layers'
    outputs followed by the fully connected layer's.
    """

    def __init__(self, config: VanillaCNNConfig):
        super().__init__(config)
        chans = [config.num_channels] + [config.channels] * config.depth
        self.layers = nn.ModuleList(
            VanillaConvLayer(chans[i], chans[i + 1], config.kernel_size, config.activation)
            for i in range(config.depth)
        )
        self.fc = VanillaDenseLayer(config.channels * config.image_size**2, config.fc_size, config.activation)
        self.classifier = nn.Linear(config.fc_size, config.num_labels)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, num_channels, image_size, image_size)`): images.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices; gives `loss` (cross-entropy).
            output_hidden_states (`bool`, *optional*): return the post-activation output of every hidden layer.
            return_dict (`bool`, *optional*): return an `ImageClassifierOutput` (default) instead of a tuple.
        """
        x = self._check_pixel_values(pixel_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        c, s = self.config.num_channels, self.config.image_size
        if x.dim() == 2 and x.shape[1] == c * s * s:
            # Accept flattened images too (e.g. the same tensors an MLP is fed).
            x = x.view(x.shape[0], c, s, s)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"VanillaCNNForImageClassification expects pixel_values of shape (B, {c}, {s}, {s}), got "
                f"{tuple(pixel_values.shape)}."
            )
        hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.fc(x.flatten(1))
        if hidden_states is not None:
            hidden_states.append(x)
        logits = self.classifier(x)
        return self._outputs(logits, labels, hidden_states, return_dict)
