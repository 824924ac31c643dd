"""Configurations of the "vanilla" deep networks of Peer et al. (TMLR 2022): no skip connections, no normalization,
no dropout.

This file is copied next to the weights by `save_pretrained` (`register_for_auto_class`) and loaded with
`trust_remote_code=True` on machines without `hf_batch_entropy`, so it may import only `transformers`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["VanillaCNNConfig", "VanillaMLPConfig"]

# PreTrainedConfig defaults to 2 labels; the vanilla experiments (digits, MNIST, CIFAR-10) have 10 classes.
_DEFAULT_NUM_LABELS = 10

# The initializations each architecture offers (`initialization`); see the configs' docstrings.
MLP_INITIALIZATIONS = ("default", "orthogonal")
CNN_INITIALIZATIONS = ("default", "delta_orthogonal")


def default_init_gain(activation: str) -> float:
    """σ_w of the orthogonal schemes when `init_gain` is not given: √2 for ReLU (an orthogonal map times √2 keeps the
    second moment of ReLU outputs, as He's gain does), 1.05 for tanh, 1.0 for any other activation.

    Why 1.05 for tanh (with σ_b = 0): σ_w = 1, σ_b = 0 is the critical point of the mean-field analyses behind
    dynamical isometry (Pennington et al. 2017; Xiao et al. 2018), where an orthogonal tanh network's input-output
    Jacobian stays close to an isometry, but there the activations shrink with depth (the fixed point of their
    variance is 0): at depth 500, on a batch of digits, the last layer's activations have std 0.03 at σ_w = 1 and
    0.22 at σ_w = 1.05 (both MLP width 64 and CNN of 8 channels), just off the critical point."""
    return 2.0**0.5 if activation == "relu" else 1.05 if activation == "tanh" else 1.0


def _check_common(config: PreTrainedConfig, initializations: tuple[str, ...]) -> None:
    """Fail at config time (not deep inside the model) on a bad depth, input shape, activation name or
    initialization; fills in the orthogonal schemes' default gain, so that a saved config records the one used."""
    from transformers.activations import ACT2FN

    if config.initialization not in initializations:
        raise ValueError(f"{type(config).__name__}: initialization must be one of {initializations}, got "
                         f"{config.initialization!r}.")
    if config.initialization != "default" and config.init_gain is None:
        config.init_gain = default_init_gain(config.activation)
    if config.init_gain is not None and not (isinstance(config.init_gain, (int, float)) and config.init_gain > 0):
        raise ValueError(f"{type(config).__name__}: init_gain must be a number > 0, got {config.init_gain!r}.")
    if not (isinstance(config.init_bias_std, (int, float)) and config.init_bias_std >= 0):
        raise ValueError(f"{type(config).__name__}: init_bias_std must be a number >= 0, got {config.init_bias_std!r}.")

    if not isinstance(config.depth, int) or config.depth < 1:
        raise ValueError(f"{type(config).__name__}: depth must be an integer >= 1, got {config.depth!r}.")
    if not isinstance(config.num_channels, int) or config.num_channels < 1:
        raise ValueError(f"{type(config).__name__}: num_channels must be an integer >= 1, got {config.num_channels!r}.")
    if not isinstance(config.image_size, int) or config.image_size < 1:
        raise ValueError(f"{type(config).__name__}: image_size must be an integer >= 1, got {config.image_size!r}.")
    if config.activation not in ACT2FN:
        raise ValueError(
            f"{type(config).__name__}: unknown activation {config.activation!r}; "
            f"choose one of transformers.activations.ACT2FN: {sorted(ACT2FN)}."
        )


class VanillaMLPConfig(PreTrainedConfig):
    r"""
    Configuration of [`VanillaMLPForImageClassification`]: a plain multilayer perceptron on flattened images,

        h_0 = flatten(pixel_values)                  (B, num_channels·image_size²)
        h_l = act(W_l h_{l-1} + b_l),  l = 1…depth   (B, width)
        logits = W_out h_depth + b_out               (B, num_labels)

    with no skip connection, normalization or dropout, initialized with PyTorch's default (`nn.Linear.reset_parameters`,
    as in the paper). Such a network of depth 500 does not train: the batch-entropy of its deep layers is 0 at
    initialization. It trains with layerwise batch-entropy regularization.

    `initialization="orthogonal"` is the alternative of the dynamical-isometry papers (Saxe et al. 2014; Pennington
    et al. 2017): every weight matrix (the classifier's too) is σ_w·Q with Q a random orthogonal matrix (semi-orthogonal
    when not square; `torch.nn.init.orthogonal_`), σ_w = `init_gain` (the classifier's gain is 1), and every bias is
    drawn from N(0, σ_b²), σ_b = `init_bias_std` (0: zero biases). With tanh, σ_w = 1 and σ_b = 0 is the critical
    point at which the singular values of the input-output Jacobian stay near 1 at any depth; the default gain for
    tanh is 1.05, just off it (`default_init_gain` says why).

    Args:
        depth (`int`, defaults to 500): number of hidden layers (Linear + activation); the classifier comes on top.
        width (`int`, defaults to 64): units per hidden layer (the paper uses 1000 on MNIST).
        activation (`str`, defaults to `"relu"`): a key of `transformers.activations.ACT2FN`.
        num_channels (`int`, defaults to 1): channels of the input images.
        image_size (`int`, defaults to 8): side of the (square) input images; 8 for scikit-learn digits, 28 for MNIST.
        num_labels (`int`, defaults to 10): number of classes.
        initialization (`str`, defaults to `"default"`): `"default"` (PyTorch's, as in the paper) or `"orthogonal"`.
        init_gain (`float`, *optional*): σ_w of `"orthogonal"`; default `default_init_gain(activation)`: √2 for ReLU,
            1.05 for tanh, 1.0 for the others. Filled in by the config, so that a saved model records it.
        init_bias_std (`float`, defaults to 0.0): σ_b of `"orthogonal"`, the std of the normal biases (0: zeros).
    """

    model_type = "vanilla_mlp"

    depth: int = 500
    width: int = 64
    activation: str = "relu"
    num_channels: int = 1
    image_size: int = 8
    initialization: str = "default"
    init_gain: float | None = None
    init_bias_std: float = 0.0

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = _DEFAULT_NUM_LABELS
        super().__post_init__(**kwargs)
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"VanillaMLPConfig: width must be an integer >= 1, got {self.width!r}.")
        _check_common(self, MLP_INITIALIZATIONS)

    @property
    def input_dim(self) -> int:
        """Size of a flattened input image, num_channels·image_size²."""
        return self.num_channels * self.image_size * self.image_size


class VanillaCNNConfig(PreTrainedConfig):
    r"""
    Configuration of [`VanillaCNNForImageClassification`]: a plain stack of same-padded 3×3 convolutions,

        h_0 = pixel_values                                       (B, num_channels, S, S)
        h_l = act(conv3x3_l(h_{l-1})),  l = 1…depth              (B, channels, S, S)
        h_{depth+1} = act(W_fc flatten(h_depth) + b_fc)         (B, fc_size)
        logits = W_out h_{depth+1} + b_out                      (B, num_labels)

    as in the paper's reference implementation (a fully connected layer of 2·S² units before the classifier), with no
    pooling, skip connection, normalization or dropout and PyTorch's default initialization.

    `initialization="delta_orthogonal"` is the alternative of Xiao et al. (ICML 2018), "Dynamical Isometry and a Mean
    Field Theory of CNNs": every convolution kernel (C_out, C_in, k, k) is zero except its centre tap, which is σ_w·Q,
    Q a random (semi-)orthogonal C_out × C_in matrix (so at initialization each convolution is an orthogonal map of
    the channels at every pixel, an isometry); the fully connected layers get σ_w·Q too (the classifier gain 1);
    every bias is drawn from N(0, σ_b²). σ_w = `init_gain`, σ_b = `init_bias_std`; with tanh, σ_w = 1 and σ_b = 0 is
    the critical point (the default gain for tanh is 1.05, just off it: `default_init_gain`).

    Args:
        depth (`int`, defaults to 50): number of convolutional layers (conv + activation).
        channels (`int`, defaults to 8): filters per convolution (the paper uses 8).
        kernel_size (`int`, defaults to 3): odd kernel size; padding keeps the spatial size.
        fc_size (`int`, *optional*): units of the fully connected hidden layer; default 2·image_size².
        activation (`str`, defaults to `"relu"`): a key of `transformers.activations.ACT2FN`.
        num_channels (`int`, defaults to 1): channels of the input images.
        image_size (`int`, defaults to 8): side of the (square) input images.
        num_labels (`int`, defaults to 10): number of classes.
        initialization (`str`, defaults to `"default"`): `"default"` (PyTorch's, as in the paper) or
            `"delta_orthogonal"`.
        init_gain (`float`, *optional*): σ_w of `"delta_orthogonal"`; default `default_init_gain(activation)`: √2 for
            ReLU, 1.05 for tanh, 1.0 for the others. Filled in by the config, so that a saved model records it.
        init_bias_std (`float`, defaults to 0.0): σ_b of `"delta_orthogonal"`, the std of the normal biases.
    """

    model_type = "vanilla_cnn"

    depth: int = 50
    channels: int = 8
    kernel_size: int = 3
    fc_size: int | None = None
    activation: str = "relu"
    num_channels: int = 1
    image_size: int = 8
    initialization: str = "default"
    init_gain: float | None = None
    init_bias_std: float = 0.0

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = _DEFAULT_NUM_LABELS
        super().__post_init__(**kwargs)
        if not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"VanillaCNNConfig: channels must be an integer >= 1, got {self.channels!r}.")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"VanillaCNNConfig: kernel_size must be an odd integer >= 1, got {self.kernel_size!r}.")
        if self.fc_size is None:
            self.fc_size = 2 * self.image_size * self.image_size
        if not isinstance(self.fc_size, int) or self.fc_size < 1:
            raise ValueError(f"VanillaCNNConfig: fc_size must be an integer >= 1, got {self.fc_size!r}.")
        _check_common(self, CNN_INITIALIZATIONS)
